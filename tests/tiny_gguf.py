"""Build tiny GGUF files (llama / qwen2) with a byte-level BPE vocabulary for offline tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool_call>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tiny model: hidden 64 (two Q8_0/Q4_0 blocks), 4 heads of 16 (GroupQueryAttention needs a multiple of 16), 2 kv heads, 2 layers.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 64, 4, 2, 16, 64, 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bl(s: str) -> str:
    m = bytes_to_unicode()
    return "".join(m[b] for b in s.encode("utf-8"))


def vocab_and_merges() -> tuple[list[str], list[int], list[str]]:
    """tokens (specials first, then the 256 byte symbols, then merge results), types, merges."""
    byte_syms = list(bytes_to_unicode().values())
    pairs = [("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("h", "e"), ("l", "l"),
             ("he", "ll"), ("hell", "o"), ("1", "2")]
    smile = _bl("🙂")  # 4 byte symbols; merge the first two so a token ends inside the character
    pairs.append((smile[0], smile[1]))
    merged = ["".join(p) for p in pairs]
    tokens = SPECIALS + byte_syms + merged + USER_DEFINED
    types = [3] * len(SPECIALS) + [1] * (len(byte_syms) + len(merged)) + [4] * len(USER_DEFINED)
    return tokens, types, [f"{a} {b}" for a, b in pairs]


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute (HF rotate-half rows -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(vocab: int, arch: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under HF names, HF shapes."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(vocab, HIDDEN), "model.norm.weight": r(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": r(HIDDEN), p + "post_attention_layernorm.weight": r(HIDDEN),
                  p + "self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HIDDEN),
                  p + "self_attn.k_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
                  p + "self_attn.v_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
                  p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD_DIM),
                  p + "mlp.gate_proj.weight": r(INTER, HIDDEN), p + "mlp.up_proj.weight": r(INTER, HIDDEN),
                  p + "mlp.down_proj.weight": r(HIDDEN, INTER)})
        if arch == "qwen2":
            w.update({p + "self_attn.q_proj.bias": r(HEADS * HEAD_DIM),
                      p + "self_attn.k_proj.bias": r(KV_HEADS * HEAD_DIM),
                      p + "self_attn.v_proj.bias": r(KV_HEADS * HEAD_DIM)})
    return w


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, i, rest = hf.split(".", 3)
    for k, v in _TO_GGUF.items():
        if rest.startswith(k):
            return f"blk.{i}.{v}{rest[len(k):]}"
    raise KeyError(hf)


# Which tensors get quantized in the test files (the rest stay F32).
QUANT = {"model.embed_tokens.weight": Q.Q8_0, "self_attn.q_proj.weight": Q.Q8_0, "self_attn.k_proj.weight": Q.Q4_0,
         "mlp.gate_proj.weight": Q.Q4_0, "mlp.down_proj.weight": Q.Q8_0, "lm_head.weight": Q.Q8_0}


def qtype_of(hf: str):
    for k, v in QUANT.items():
        if hf.endswith(k):
            return v
    return Q.F32


def expected_after_roundtrip(w: np.ndarray, qt) -> np.ndarray:
    """What a reader must return for ``w`` stored as ``qt``: the dequantized quantized values."""
    if qt == Q.F32:
        return w
    return gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt)


def write_tiny_gguf(path: Path, arch: str = "llama", *, pre: str | None = None, tied: bool = True,
                    chat_template: str | None = CHAT_TEMPLATE, tokenizer_model: str = "gpt2",
                    extra_tensors: dict[str, np.ndarray] | None = None, add_bos: bool = False,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny GGUF; return the HF-layout float32 weights it encodes (before quantization).

    llama files get q/k permuted exactly as llama.cpp's converter does; qwen2 files do not.
    """
    tokens, types, merges = vocab_and_merges()
    vocab = len(tokens)
    w = hf_weights(vocab, arch, seed)
    if not tied:
        w["lm_head.weight"] = np.random.default_rng(seed + 1).standard_normal((vocab, HIDDEN)).astype(np.float32)
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name(f"tiny-{arch}")
    wr.add_block_count(LAYERS)
    wr.add_context_length(256)
    wr.add_embedding_length(HIDDEN)
    wr.add_feed_forward_length(INTER)
    wr.add_head_count(HEADS)
    wr.add_head_count_kv(KV_HEADS)
    wr.add_rope_freq_base(50000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    if arch == "llama":
        wr.add_uint32(f"{arch}.rope.dimension_count", HEAD_DIM)
    wr.add_tokenizer_model(tokenizer_model)
    wr.add_tokenizer_pre(pre or ("smollm" if arch == "llama" else "qwen2"))
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges(merges)
    wr.add_bos_token_id(tokens.index("<|im_start|>"))
    wr.add_eos_token_id(tokens.index("<|im_end|>"))
    wr.add_pad_token_id(tokens.index("<|endoftext|>"))
    wr.add_add_bos_token(add_bos)
    if chat_template is not None:
        wr.add_chat_template(chat_template)
    for name, arr in w.items():
        stored = arr
        if arch == "llama" and "q_proj" in name:
            stored = llama_permute(arr, HEADS)
        elif arch == "llama" and "k_proj" in name:
            stored = llama_permute(arr, KV_HEADS)
        qt = qtype_of(name)
        if qt == Q.F32:
            wr.add_tensor(gguf_name(name), np.ascontiguousarray(stored))
        else:
            wr.add_tensor(gguf_name(name), gguf.quants.quantize(stored, qt), raw_dtype=qt)
    for name, arr in (extra_tensors or {}).items():
        wr.add_tensor(name, arr)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return w
