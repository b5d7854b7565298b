"""Real-model checks on smollm2-135m (downloads ~100 MB once into the parscale-edge cache).

Run with ``pytest -m slow``. Reference token ids are those of the Hugging Face SmolLM2 tokenizer.
"""
from __future__ import annotations

import numpy as np
import pytest

from parscale_edge.gguf_io import read_gguf_config, read_gguf_tensors, read_gguf_tokenizer
from parscale_edge.hub import MODELS, fetch_gguf, sha256_file
from parscale_edge.tokenizer import StreamDecoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return fetch_gguf("smollm2-135m")


@pytest.fixture(scope="module")
def tok(smollm2):
    return read_gguf_tokenizer(smollm2)


@pytest.fixture(scope="module")
def weights(smollm2):
    return read_gguf_tensors(smollm2, progress=False)


def test_fetch_is_verified_and_cached(smollm2):
    assert smollm2.name == "smollm2-135m.gguf" and smollm2.stat().st_size == MODELS["smollm2-135m"].size
    assert sha256_file(smollm2) == MODELS["smollm2-135m"].sha256
    assert fetch_gguf("smollm2-135m", progress=False) == smollm2


def test_config(smollm2):
    c = read_gguf_config(smollm2)
    assert (c.family, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and not c.attention_bias
    assert (c.rope_theta, c.max_position_embeddings, c.bos_token_id, c.eos_token_id) == (100000.0, 8192, 1, 2)
    assert c.rms_norm_eps == pytest.approx(1e-5)


REFERENCE_IDS = {  # Hugging Face tokenizer of SmolLM2
    "Hello world, this is": [19556, 905, 28, 451, 314],
    "The quick brown fox": [504, 2365, 6354, 16438],
    "def add(a, b): return": [1604, 803, 24, 81, 28, 278, 727, 1003],
    "In 2026, the weather": [788, 216, 34, 32, 34, 38, 28, 260, 3947],
    "  spaced  text": [216, 23861, 216, 1694],
    "Hello world! 12345 def foo():\n    return 42":
        [19556, 905, 17, 216, 33, 34, 35, 36, 37, 753, 29856, 3734, 472, 1003, 216, 36, 34],
}


def test_tokenizer(tok):
    for text, ids in REFERENCE_IDS.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")  # digits split one by one
    assert tok.eos_token_ids[:2] == [2, 0]  # <|im_end|> first (the chat model's end of turn)
    assert tok.token_to_id("<|im_end|>") == 2 and tok.bos_token_id == 1 and tok.vocab_size == 49152
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(prompt)[:1] == [1] and tok.encode(prompt)[-4:] == [1, 520, 9531, 198]


def test_stream_decoder_real(tok):
    text = "Ünïcödé: 你好，世界！こんにちは 🙂👍🏽🇫🇷 done"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.put(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def _forward_nll(cfg, w, ids):
    """Mean next-token NLL of a plain numpy Llama forward (HF rotate-half RoPE)."""
    T, hd, H, KV = len(ids), cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g  # noqa: E731
    ang = np.arange(T)[:, None] / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rope = lambda q: q * cos + np.concatenate([-q[..., hd // 2:], q[..., :hd // 2]], -1) * sin  # noqa: E731
    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, H, hd).transpose(1, 0, 2))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, KV, hd).transpose(1, 0, 2))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, KV, hd).transpose(1, 0, 2)
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, H * hd)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    logits = rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T
    logits = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-lp[np.arange(T - 1), ids[1:]].mean())


def test_weights_and_rope_layout(smollm2, weights, tok):
    """The un-permuted q/k give a working model under HF's RoPE; llama.cpp's layout does not."""
    cfg = read_gguf_config(smollm2)
    assert len(weights) == 2 + 9 * 30 and "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in weights.values())
    text = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n"
            "        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\nprint(fibonacci(10))\n")
    ids = np.array(tok.encode(text))
    good = _forward_nll(cfg, weights, ids)

    def permute(a, n):  # back to llama.cpp's row order
        return a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    bad_w = dict(weights)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        bad_w[p + "q_proj.weight"] = permute(weights[p + "q_proj.weight"], cfg.num_attention_heads)
        bad_w[p + "k_proj.weight"] = permute(weights[p + "k_proj.weight"], cfg.num_key_value_heads)
    bad = _forward_nll(cfg, bad_w, ids)
    print(f'NLL un-permuted {good:.3f}, llama.cpp layout {bad:.3f}')
    assert good < 1.5, good  # a 135M code model predicts this snippet well (PPL < 4.5)
    assert bad > good + 1.0, (good, bad)
