"""Row 6, quantized output that degenerates: after int4/int8 (sym and asym, block 32 and 128) a fixed
question gets a continuation that is not an echo of the prompt, not one repeated token, and a
natural sentence keeps a mean log-probability far above uniform (ln(1/V) + 3).

Fast: a tiny model trained to answer short questions (every weight dimension divides 128). Slow:
smollm2-135m (hidden 576: block 128 does not divide it, which must be a clear error)."""
import math
import warnings

import numpy as np
import pytest

from parscale_edge.runtime import OnnxCausalLM, SamplingConfig
from parscale_edge.quant.onnx_quant import QuantConfig, QuantizationError, quantize_folder

QUESTION = b"Q: What is the capital of France?\nA:"
SENTENCE = b"Q: What do bees make?\nA: Bees make honey from the nectar of flowers.\n"


def mean_logprob(rt, ids: list[int]) -> float:
    """Mean log-probability (nats) of ids[1:] given their prefixes."""
    logits = rt.score(np.array([ids], dtype=np.int64))  # either graph kind
    x = logits[0, :-1].astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(logp[np.arange(len(ids) - 1), ids[1:]].mean())


def assert_not_degenerate(rt, prompt: list[int], sentence: list[int], n: int = 24) -> list[int]:
    out = rt.generate([prompt], SamplingConfig(max_new_tokens=n), eos_token_ids=[])[0]
    assert len(out) == n
    assert len(set(out)) >= 5, f"one or a few tokens repeated: {out}"
    k = min(len(out), len(prompt))
    assert out[:k] != prompt[:k] and out[:8] != prompt[-8:], f"echo of the prompt: {out}"
    floor = math.log(1 / rt.manifest.vocab_size) + 3
    lp = mean_logprob(rt, sentence)
    assert lp > floor, f"mean log-probability {lp:.2f} is not above ln(1/V)+3 = {floor:.2f}"
    return out


VARIANTS = [(p, s, b) for p in ("int4", "int8") for s in (True, False) for b in (32, 128)]


@pytest.mark.parametrize("precision,symmetric,block", VARIANTS,
                         ids=[f"{p}-{'sym' if s else 'asym'}-b{b}" for p, s, b in VARIANTS])
def test_quantized_answer_is_not_degenerate(trained, tmp_path, precision, symmetric, block):
    _, fp32 = trained
    answer = assert_not_degenerate(fp32, list(QUESTION), list(SENTENCE), n=32)
    assert bytes(answer).startswith(b" The capital of France is Paris.")  # what the model learned
    cfg = QuantConfig(precision=precision, symmetric=symmetric, block_size=block)
    rt = OnnxCausalLM(quantize_folder(fp32.folder, tmp_path / "q", cfg, check_positions=0, compare_positions=0),
                      device="cpu", threads=1)
    assert rt.manifest.quantization["block_size"] == block and rt.manifest.quantization["symmetric"] == symmetric
    out = assert_not_degenerate(rt, list(QUESTION), list(SENTENCE), n=32)
    assert b"Paris" in bytes(out), bytes(out)


# ------------------------------------------------------------------------------ real model (slow)
@pytest.fixture(scope="module")
def smollm2_fp32():
    from parscale_edge.prepare import ensure_export

    return ensure_export("smollm2-135m", 1, threads=1, progress=False)


REAL = [dict(precision="int4"),  # default: the GGUF's own blocks
        dict(precision="int4", symmetric=True, gguf_blocks=False), dict(precision="int4", gguf_blocks=False),
        dict(precision="int8", symmetric=True, gguf_blocks=False), dict(precision="int8", gguf_blocks=False)]


@pytest.mark.slow
@pytest.mark.parametrize("kw", REAL, ids=["int4-gguf", "int4-sym-rtn", "int4-asym-rtn", "int8-sym-rtn", "int8-asym-rtn"])
def test_real_model_quantized_answer_is_not_degenerate(smollm2_fp32, tmp_path, kw):
    rt = OnnxCausalLM(quantize_folder(smollm2_fp32, tmp_path / "q", QuantConfig(block_size=32, **kw),
                                      check_positions=0, compare_positions=0, threads=1), device="cpu", threads=1)
    tok = rt.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    sentence = tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
    assert_not_degenerate(rt, prompt, sentence, n=16)  # (a 135M model does not reliably say "Paris")


@pytest.mark.slow
def test_real_model_block_128_that_does_not_divide_hidden_is_a_clear_error(smollm2_fp32, tmp_path):
    with warnings.catch_warnings(), pytest.raises(QuantizationError, match="block size 128 does not divide .*: 576"):
        quantize_folder(smollm2_fp32, tmp_path / "q", QuantConfig(block_size=128, gguf_blocks=False),
                        check_positions=0, compare_positions=0)
    assert not (tmp_path / "q").exists()
