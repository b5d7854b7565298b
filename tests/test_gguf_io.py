"""parscale_edge.gguf_io on tiny GGUF files written with gguf.GGUFWriter (offline, fast)."""
from __future__ import annotations

import numpy as np
import pytest

import gguf
from parscale_edge.config import UnsupportedModelError
from parscale_edge.gguf_io import open_gguf, read_gguf, read_gguf_config, read_gguf_tensors, read_gguf_tokenizer
from tiny_gguf import (HEAD_DIM, HEADS, HIDDEN, INTER, KV_HEADS, LAYERS, expected_after_roundtrip, llama_permute, qtype_of,
                       vocab_and_merges, write_tiny_gguf)

N_TOKENS = len(vocab_and_merges()[0])


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return p, write_tiny_gguf(p, "llama")


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    return p, write_tiny_gguf(p, "qwen2", tied=False)


# ------------------------------------------------------------------------------------ config
def test_config_llama(llama_file):
    cfg = read_gguf_config(llama_file[0])
    assert cfg.family == "llama"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (N_TOKENS, HIDDEN, INTER, LAYERS)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg.rope_theta == 50000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.max_position_embeddings == 256
    assert cfg.tie_word_embeddings is True and cfg.attention_bias is False
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == 2 and cfg.parscale_n == 1


def test_config_qwen2(qwen_file):
    cfg = read_gguf_config(qwen_file[0])
    assert cfg.family == "qwen2"
    assert cfg.attention_bias is True
    assert cfg.tie_word_embeddings is False  # the file has output.weight
    assert cfg.to_hf_dict()["model_type"] == "qwen2_parscale"


def test_key_length_sets_head_dim(tmp_path):
    p = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    for k, v in [("block_count", 1), ("embedding_length", 64), ("feed_forward_length", 128),
                 ("attention.head_count", 2), ("attention.head_count_kv", 1), ("attention.key_length", 16),
                 ("attention.value_length", 16), ("vocab_size", 99)]:
        w.add_uint32(f"llama.{k}", v)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    cfg = read_gguf_config(p)
    assert cfg.head_dim == 16 and cfg.vocab_size == 99 and cfg.tie_word_embeddings


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(p), "gemma2")
    w.add_uint32("gemma2.block_count", 1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    for fn in (read_gguf_config, read_gguf_tensors):
        with pytest.raises(UnsupportedModelError, match=r"gemma2.*llama, qwen2"):
            fn(p)


def test_unknown_tensor_is_refused(tmp_path):
    p = tmp_path / "x.gguf"
    write_tiny_gguf(p, "llama", extra_tensors={"blk.0.attn_q_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(UnsupportedModelError, match="attn_q_norm"):
        read_gguf_tensors(p, progress=False)


# ----------------------------------------------------------------------------------- tensors
def _check_tensors(path, orig, tied):
    got = read_gguf_tensors(path, progress=False)
    expected = set(orig)
    assert set(got) == expected
    assert ("lm_head.weight" in got) == (not tied)
    for name, w in orig.items():
        g = got[name]
        assert g.dtype == np.float32 and g.shape == w.shape and g.flags.c_contiguous, name
        exp = expected_after_roundtrip(w, qtype_of(name))
        np.testing.assert_array_equal(g, exp, err_msg=name)
        if qtype_of(name) != gguf.GGMLQuantizationType.F32:  # quantized: close to the original, not equal
            assert np.abs(g - w).max() < 0.5 * np.abs(w).max(), name
    return got


def test_tensors_llama_unpermuted(llama_file):
    path, orig = llama_file
    got = _check_tensors(path, orig, tied=True)
    # q is Q8_0 and k is Q4_0 in the file, stored in llama.cpp's permuted row order: the reader must
    # give back HF's order. Without un-permuting, rows would be interleaved:
    name = "model.layers.0.self_attn.q_proj.weight"
    assert qtype_of(name) == gguf.GGMLQuantizationType.Q8_0
    q, ref = got[name], expected_after_roundtrip(orig[name], qtype_of(name))
    np.testing.assert_array_equal(q, ref)
    assert not np.array_equal(llama_permute(ref, HEADS), ref)  # sanity: the file's row order differs


def test_tensors_qwen2_not_permuted_with_bias_and_lm_head(qwen_file):
    path, orig = qwen_file
    got = _check_tensors(path, orig, tied=False)
    np.testing.assert_array_equal(got["model.layers.1.self_attn.k_proj.bias"], orig["model.layers.1.self_attn.k_proj.bias"])


def test_f32_permuted_roundtrip_exact(tmp_path):
    """All-F32 llama file: every tensor, q/k included, comes back bit-exact."""
    import tiny_gguf

    p = tmp_path / "f32.gguf"
    old = dict(tiny_gguf.QUANT)
    tiny_gguf.QUANT.clear()
    try:
        orig = write_tiny_gguf(p, "llama", seed=3)
    finally:
        tiny_gguf.QUANT.update(old)
    got = read_gguf_tensors(p, progress=False)
    for k, v in orig.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


# ------------------------------------------------------------------------------- corrupt files
@pytest.mark.parametrize("cut", ["empty", "magic", "header", "tensor_data", "not_gguf"])
def test_corrupt_files_raise_clear_valueerror(llama_file, tmp_path, cut):
    data = llama_file[0].read_bytes()
    blob = {"empty": b"", "magic": b"GGUF", "header": data[:64], "tensor_data": data[:-100],
            "not_gguf": b"<html>404 Not Found</html>"}[cut]
    p = tmp_path / f"{cut}.gguf"
    p.write_bytes(blob)
    for fn in (read_gguf_config, read_gguf_tokenizer, lambda q: read_gguf_tensors(q, progress=False)):
        with pytest.raises(ValueError, match="not a (valid )?GGUF") as ei:
            fn(p)
        assert str(p) in str(ei.value) and "download" in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_gguf_config(tmp_path / "nope.gguf")


# --------------------------------------------------------------------------------- tokenizer
SAMPLE = "Hello world! 12345 def foo():\n    return 42"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_roundtrip(arch, llama_file, qwen_file):
    path = (llama_file if arch == "llama" else qwen_file)[0]
    tok = read_gguf_tokenizer(path)
    tokens = vocab_and_merges()[0]
    assert tok.vocab_size == len(tokens)
    for text in [SAMPLE, "héllo wörld 你好，世界 🙂👍🏽\r\n\n  x", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    ids = tok.encode("hello world")
    assert [tok.id_to_token(i) for i in ids] == ["hello", "Ġworld"]
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    assert tok.eos_token_ids == [2, 0]  # eos (<|im_end|>) then <|endoftext|>


def test_digits_split_per_pre_tokenizer(tmp_path):
    """The file has a merge '1 2': smollm and qwen2 split digits first, gpt2 does not."""
    out = {}
    for pre in ("smollm", "qwen2", "gpt2"):
        p = tmp_path / f"{pre}.gguf"
        write_tiny_gguf(p, "llama", pre=pre)
        tok = read_gguf_tokenizer(p)
        out[pre] = [tok.id_to_token(i) for i in tok.encode("x 12")]
    assert out["smollm"] == ["x", "Ġ", "1", "2"]
    assert out["qwen2"] == ["x", "Ġ", "1", "2"]
    assert out["gpt2"] == ["x", "Ġ", "12"]


def test_unknown_pre_warns(tmp_path):
    p = tmp_path / "w.gguf"
    write_tiny_gguf(p, "llama", pre="some-new-model")
    with pytest.warns(UserWarning, match="some-new-model"):
        read_gguf_tokenizer(p)


def test_special_and_user_defined_tokens(llama_file):
    tok = read_gguf_tokenizer(llama_file[0])
    ids = tok.encode("<|im_start|>user\nhello<|im_end|><tool_call>")
    assert ids[0] == 1 and ids[-2] == 2 and tok.id_to_token(ids[-1]) == "<tool_call>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhello<tool_call>"  # user-defined is kept
    assert tok.decode(ids) == "<|im_start|>user\nhello<|im_end|><tool_call>"


def test_add_bos_token(tmp_path):
    p = tmp_path / "bos.gguf"
    write_tiny_gguf(p, "llama", add_bos=True)
    tok = read_gguf_tokenizer(p)
    assert tok.encode("hello", add_special_tokens=True)[0] == tok.bos_token_id
    assert tok.encode("hello")[0] != tok.bos_token_id


def test_chat_template_from_gguf(llama_file):
    tok = read_gguf_tokenizer(llama_file[0])
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_non_bpe_tokenizer_refused(tmp_path):
    p = tmp_path / "spm.gguf"
    write_tiny_gguf(p, "llama", tokenizer_model="llama")
    with pytest.raises(ValueError, match="tokenizer model 'llama' is not supported"):
        read_gguf_tokenizer(p)


def test_read_gguf_one_parse(qwen_file):
    path, orig = qwen_file
    cfg, tensors, tok = read_gguf(path, progress=False)
    assert cfg == read_gguf_config(path)
    assert set(tensors) == set(orig) and tok.encode(SAMPLE) == read_gguf_tokenizer(path).encode(SAMPLE)
    reader = open_gguf(path)
    assert open_gguf(reader) is reader and read_gguf_config(reader) == cfg
