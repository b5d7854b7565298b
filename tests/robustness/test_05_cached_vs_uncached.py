"""Row 5, cached against uncached: "prefill k tokens, then decode one at a time" equals "prefill all
at once" within 1e-4 (fp32) at every position. Quantized graphs whose kernels depend on the number
of rows (per-tensor dynamic int8; int4 MatMulNBits at accuracy_level 4) differ: the difference is
measured and bounded here, and documented in docs/quantization.md."""
import warnings

import numpy as np
import pytest

from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder
from robustness.helpers import QA_TEXT, full_logits


def cached_logits(rt, ids: list[int], k: int, chunk: int = 1) -> np.ndarray:
    """float32 [S, vocab]: prefill ``ids[:k]``, then feed the rest ``chunk`` tokens at a time."""
    a = np.array([ids], dtype=np.int64)
    logits, past = rt.forward(a[:, :k], np.ones((1, k), np.int64), np.arange(k)[None])
    out = [logits[0]]
    for i in range(k, len(ids), chunk):
        j = min(i + chunk, len(ids))
        logits, past = rt.forward(a[:, i:j], np.ones((1, j), np.int64), np.arange(i, j)[None], past)
        out.append(logits[0])
    return np.concatenate(out)


@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_fp32_prefill_then_decode_equals_one_prefill(tiny_exports, P):
    _, rt = tiny_exports[P]
    ids = np.random.default_rng(P).integers(0, 97, 24).tolist()
    ref = full_logits(rt, ids)
    for k, chunk in [(1, 1), (7, 1), (23, 1), (5, 6)]:
        got = cached_logits(rt, ids, k, chunk)
        assert got.shape == ref.shape
        err = np.abs(got - ref).max(-1)  # per position
        assert err.max() <= 1e-4, (k, chunk, err.argmax(), err.max())


def _quantized(src, tmp_path, name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int8-dynamic warns that it is fragile: known, measured here
        return OnnxCausalLM(quantize_folder(src, tmp_path / name, QuantConfig(**kw), check_positions=0,
                                            compare_positions=0), device="cpu", threads=1)


# (settings, bound on max |cached - uncached| logit difference). Measured on the trained Q/A model
# (logit range about 18): int8-dynamic 0.19-0.27, int4 and int8 at level 4 0.04 (int8 level 4 was
# below 1e-5 with head_dim 8, 0.035 with head_dim 16), the others below 1e-5.
QUANT_CASES = [
    (dict(precision="int8", accuracy_level=0), 1e-4),
    (dict(precision="int8", accuracy_level=4), 0.15),  # int8 activations, per-block, kernel depends on rows
    (dict(precision="int4", accuracy_level=0), 1e-4),
    (dict(precision="int4", accuracy_level=4), 0.15),  # int8 activations, per-block, kernel depends on rows
    (dict(precision="int8-dynamic"), 0.6),  # one activation scale per tensor: depends on the other tokens
]


@pytest.mark.parametrize("kw,bound", QUANT_CASES, ids=[f"{c['precision']}-L{c.get('accuracy_level', '-')}" for c, _ in QUANT_CASES])
def test_quantized_cached_vs_uncached_difference_is_bounded(trained, tmp_path, kw, bound):
    _, fp32 = trained
    rt = _quantized(fp32.folder, tmp_path, "q", **kw)
    ids = list(QA_TEXT.encode())[:80]
    ref = full_logits(rt, ids)
    worst, agree = 0.0, []
    for k in (1, 20, 79):
        got = cached_logits(rt, ids, k)
        worst = max(worst, float(np.abs(got - ref).max()))
        agree.append(float((got.argmax(-1) == ref.argmax(-1)).mean()))
    assert worst <= bound, worst
    assert min(agree) >= 0.97, agree  # the difference never changes more than a few greedy choices
