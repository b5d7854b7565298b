"""Read GGUF checkpoints (llama.cpp's format) with the ``gguf`` package: config, weights, tokenizer.

No torch and no transformers: transformers' GGUF path needs accelerate, spends 8-11 s converting
the tokenizer and produces a model that ``save_pretrained`` refuses (docs/parscale.md, "GGUF without transformers"). Here a GGUF
becomes the three things the rest of parscale-edge uses:

* :func:`read_gguf_config` -> :class:`parscale_edge.config.ParScaleConfig` (dense, ``parscale_n = 1``);
* :func:`read_gguf_tensors` -> ``{hf_name: float32 ndarray}`` under Hugging Face names and shapes;
* :func:`read_gguf_tokenizer` -> :class:`parscale_edge.tokenizer.Tokenizer` (byte-level BPE + chat template).

Each ``read_gguf_*`` takes a path or a reader from :func:`open_gguf` (parsing a large vocabulary's
metadata takes seconds); :func:`read_gguf` returns all three from one parse.

Supported: ``general.architecture`` ``llama`` and ``qwen2``; tokenizer model ``gpt2`` (byte-level
BPE); every tensor type ``gguf.quants.dequantize`` knows (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q2_K..Q6_K, IQ*). A file that is not a readable GGUF raises ``ValueError`` naming it.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from parscale_edge.config import ParScaleConfig, UnsupportedModelError

__all__ = ["read_gguf", "read_gguf_config", "read_gguf_tensors", "read_gguf_tokenizer", "open_gguf",
           "SUPPORTED_GGUF_ARCHITECTURES", "gguf_to_hf_name"]

#: general.architecture values we read.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

# GGUF tensor name -> Hugging Face name (per-layer names use {i}).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# Pre-tokenizer split patterns (llama.cpp names them in tokenizer.ggml.pre).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_to_hf_name(name: str) -> str | None:
    """Hugging Face name of a GGUF tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None when it is not one we map."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


# ----------------------------------------------------------------------------------- opening
def _invalid(path: Any, why: str) -> ValueError:
    return ValueError(f"{path} is not a valid GGUF file ({why}); it may be truncated or corrupt: "
                      f"delete it and download it again")


def _display(src) -> str:
    """The file name of a path or an open GGUFReader, for messages."""
    fn = getattr(getattr(src, "data", None), "filename", None)
    return str(fn if fn is not None else src)


def open_gguf(path):
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped) and check that every tensor's data
    lies inside the file. Parsing the metadata is slow for large vocabularies (about 1.7 s for
    smollm2-135m, 5.5 s for qwen2.5-coder-0.5b on one core): open once and pass the reader to the
    ``read_gguf_*`` functions, which accept a path or a reader, or use :func:`read_gguf`.

    Args:
        path: ``str``/``PathLike``, or an already-open ``GGUFReader`` (returned unchanged).

    Returns:
        gguf.GGUFReader

    Raises:
        FileNotFoundError / IsADirectoryError / PermissionError: as for ``open``.
        ValueError: the file is not a GGUF, or it is truncated or corrupt (the message names the
            file and asks to re-download it) - never a raw numpy/struct error.
    """
    from gguf import GGUFReader

    if isinstance(path, GGUFReader):
        return path
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a folder, not a GGUF file")
    size = p.stat().st_size
    with open(p, "rb") as f:  # also raises PermissionError early
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{p} is not a GGUF file (it does not start with the GGUF magic bytes; "
                         f"found {magic!r}); if it should be one, delete it and download it again")
    try:
        reader = GGUFReader(p)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # struct/numpy/unicode/overflow errors from a damaged header
        raise _invalid(p, f"{type(e).__name__}: {e}") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise _invalid(p, f"tensor {t.name!r} needs bytes up to {end} but the file has {size}")
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:
        raise ValueError(f"GGUF metadata key {key!r} is unreadable ({type(e).__name__}: {e}); "
                         f"the file may be corrupt") from None


def _arch(reader, path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; parscale-edge reads "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    return arch


# ------------------------------------------------------------------------------------ config
def _config_from_reader(reader, path) -> ParScaleConfig:
    arch = _arch(reader, path)

    def req(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ValueError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        if isinstance(v, list):
            raise UnsupportedModelError(f"{path}: per-layer {arch}.{key} ({v[:4]}...) is not supported")
        return v

    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedModelError(f"{path}: RoPE scaling {scaling!r} is not supported; only plain RoPE is")
    tensor_names = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise UnsupportedModelError(f"{path}: the file carries rope_freqs (Llama-3.1 style RoPE scaling), "
                                    f"which is not supported")
    n_head = int(req("attention.head_count"))
    n_kv = _field(reader, f"{arch}.attention.head_count_kv", n_head)
    if isinstance(n_kv, list):
        raise UnsupportedModelError(f"{path}: per-layer head_count_kv is not supported")
    hidden = int(req("embedding_length"))
    head_dim = _field(reader, f"{arch}.attention.key_length")
    v_dim = _field(reader, f"{arch}.attention.value_length")
    if head_dim is not None and v_dim is not None and int(v_dim) != int(head_dim):
        raise UnsupportedModelError(f"{path}: key_length {head_dim} != value_length {v_dim} is not supported")
    hd = int(head_dim) if head_dim is not None else hidden // n_head
    rot = _field(reader, f"{arch}.rope.dimension_count")
    if rot is not None and int(rot) != hd:
        raise UnsupportedModelError(f"{path}: partial rotary embedding (rope.dimension_count {rot} < "
                                    f"head_dim {hd}) is not supported")
    emb = tensor_names.get("token_embd.weight")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if emb is not None:
        vocab = int(emb.shape[-1])  # GGUF shapes are [in, out]: [hidden, vocab]
    elif _field(reader, f"{arch}.vocab_size") is not None:
        vocab = int(_field(reader, f"{arch}.vocab_size"))
    elif tokens is not None:
        vocab = len(tokens.data)
    else:
        raise ValueError(f"{path}: cannot determine the vocabulary size (no token_embd.weight, "
                         f"{arch}.vocab_size or tokenizer.ggml.tokens)")
    has_bias = "blk.0.attn_q.bias" in tensor_names
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    try:  # a value of the wrong type or range in the metadata: name the file
        return ParScaleConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(req("feed_forward_length")),
            num_hidden_layers=int(req("block_count")),
            num_attention_heads=n_head,
            num_key_value_heads=int(n_kv),
            head_dim=hd,
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias=True if arch == "qwen2" else has_bias,
            family=arch,
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=None if eos is None else int(eos),
            extra={"gguf_name": _field(reader, "general.name"), "gguf_file_type": _field(reader, "general.file_type")},
        )
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None


def read_gguf_config(path) -> ParScaleConfig:
    """Model hyper-parameters of a GGUF as a dense :class:`ParScaleConfig` (``parscale_n = 1``).

    Mapping (``A`` = general.architecture): ``A.block_count`` -> num_hidden_layers,
    ``A.embedding_length`` -> hidden_size, ``A.feed_forward_length`` -> intermediate_size,
    ``A.attention.head_count(_kv)`` -> num_attention_heads / num_key_value_heads,
    ``A.attention.key_length`` -> head_dim (else hidden/heads), ``A.rope.freq_base`` -> rope_theta,
    ``A.attention.layer_norm_rms_epsilon`` -> rms_norm_eps, ``A.context_length`` ->
    max_position_embeddings; vocab_size from the ``token_embd.weight`` rows (else ``A.vocab_size``,
    else the tokenizer's token count); ``tie_word_embeddings`` is True exactly when there is no
    ``output.weight``; ``attention_bias`` is True for qwen2 (and for llama when q bias exists);
    bos/eos from ``tokenizer.ggml.bos_token_id`` / ``eos_token_id`` (end-of-turn stop tokens come
    from :func:`read_gguf_tokenizer`).

    Raises:
        UnsupportedModelError: architecture other than llama/qwen2 (the message names it and the
            supported ones), RoPE scaling, partial rotary, per-layer head counts.
        ValueError: not a valid GGUF, or a required key is missing.
        FileNotFoundError: no such file.
    """
    reader = open_gguf(path)
    return _config_from_reader(reader, _display(path))


# ----------------------------------------------------------------------------------- tensors
def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows for its interleaved RoPE (transformers'
    ``reverse_permute_weights``): rows go from pairs (2i, 2i+1) per head back to halves."""
    dim = w.shape[0]
    if dim % (2 * n_head):
        raise ValueError(f"cannot un-permute a q/k tensor of {dim} rows for {n_head} heads")
    rest = w.shape[1:]
    return w.reshape(n_head, dim // n_head // 2, 2, *rest).swapaxes(2, 1).reshape(w.shape)


def read_gguf_tensors(path, progress: bool = True) -> dict[str, np.ndarray]:
    """All weights of a llama/qwen2 GGUF, dequantized to float32, under Hugging Face names.

    Returns:
        ``{name: np.ndarray[float32]}``, C-contiguous and owning its memory (the file is not kept
        open), shaped like the Hugging Face parameters: Linear weights ``[out_features,
        in_features]``, biases and norm weights ``[n]``, ``model.embed_tokens.weight`` ``[vocab,
        hidden]``. ``lm_head.weight`` is present only when the file has ``output.weight`` (otherwise
        the model ties it to the embedding, see ``tie_word_embeddings``). For ``llama`` files the
        q/k projections (weights and biases) are un-permuted from llama.cpp's RoPE layout back to
        Hugging Face's (n_head = num_attention_heads for q, num_key_value_heads for k); ``qwen2``
        files are stored unpermuted. Memory: 4 bytes per parameter (about 0.54 GB for 135M).

    Args:
        progress: show a tqdm bar over tensors (on stderr).

    Raises:
        ValueError: not a valid GGUF / truncated file, or a tensor type gguf cannot dequantize.
        UnsupportedModelError: unsupported architecture, or tensors we do not know how to map
            (their names are listed; silently dropping weights would give a wrong model).
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    reader = open_gguf(path)
    path = _display(path)
    cfg = _config_from_reader(reader, path)
    unknown = [t.name for t in reader.tensors if gguf_to_hf_name(t.name) is None]
    if unknown:
        raise UnsupportedModelError(f"{path}: tensors not understood by parscale-edge: "
                                    f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    permuted = cfg.family == "llama"
    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc=f"reading {Path(path).name}", unit="tensor", disable=not progress):
        name = gguf_to_hf_name(t.name)
        qtype = GGMLQuantizationType(t.tensor_type)
        try:
            w = dequantize(t.data, qtype)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {t.name} has type {qtype.name}, which cannot be "
                             f"dequantized: {e}") from None
        except (ValueError, IndexError) as e:
            raise _invalid(path, f"tensor {t.name}: {e}") from None
        shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))  # GGUF lists dims innermost-first
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if permuted and (t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias")):
            w = unpermute_rope(w, cfg.num_attention_heads)
        elif permuted and (t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias")):
            w = unpermute_rope(w, cfg.num_key_value_heads)
        out[name] = np.array(w, dtype=np.float32, order="C", copy=True)  # own the memory (no memmap view)
    del reader
    _check_complete(out, cfg, path)
    return out


def _check_complete(tensors: dict[str, np.ndarray], cfg: ParScaleConfig, path) -> None:
    """Every tensor the model needs is there with the shape the config implies."""
    h, hd = cfg.hidden_size, cfg.head_dim
    expect = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        expect["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        expect.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, h),
            p + "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_attention_heads * hd),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        })
        if cfg.attention_bias:
            expect.update({p + "self_attn.q_proj.bias": (cfg.num_attention_heads * hd,),
                           p + "self_attn.k_proj.bias": (cfg.num_key_value_heads * hd,),
                           p + "self_attn.v_proj.bias": (cfg.num_key_value_heads * hd,)})
    missing = [k for k in expect if k not in tensors]
    if missing:
        raise ValueError(f"{path}: GGUF lacks tensors {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    bad = [f"{k} {tensors[k].shape} != {s}" for k, s in expect.items() if tensors[k].shape != s]
    if bad:
        raise ValueError(f"{path}: tensor shapes do not match the config: {'; '.join(bad[:4])}")


# --------------------------------------------------------------------------------- tokenizer
def read_gguf_tokenizer(path):
    """The GGUF's tokenizer as an :class:`parscale_edge.tokenizer.Tokenizer`.

    Builds a Hugging Face ``tokenizers`` byte-level BPE from ``tokenizer.ggml.tokens`` (id = index),
    ``tokenizer.ggml.merges`` and ``tokenizer.ggml.token_type``: CONTROL (3) tokens become special
    added tokens (matched whole in text, dropped by ``skip_special_tokens``), USER_DEFINED (4)
    tokens become non-special added tokens (matched whole, kept when decoding, like Qwen's
    ``<tool_call>`` in Hugging Face). The pre-tokenizer follows ``tokenizer.ggml.pre``:

    * ``smollm``: Digits(individual_digits) then ByteLevel(regex) - SmolLM/SmolLM2;
    * ``qwen2``: NFC normalizer, Split(qwen2 regex, isolated), ByteLevel(no regex);
    * ``llama-bpe``/``llama3``: like qwen2 with the Llama-3 regex (digits in groups of 1-3);
    * ``gpt2``, ``default`` or missing: ByteLevel(regex) (GPT-2); any other value falls back to it
      with a warning, since the real split rule is unknown.

    Special tokens from ``tokenizer.ggml.{bos,eos,padding,unknown}_token_id``; a bos is prepended
    by ``encode(..., add_special_tokens=True)`` only when ``tokenizer.ggml.add_bos_token`` is true.
    The chat template from ``tokenizer.chat_template`` (else ChatML at render time).

    Raises:
        ValueError: not a valid GGUF; no tokenizer in it; a tokenizer model other than ``gpt2``
            (e.g. SentencePiece ``llama``), which parscale-edge does not rebuild.
    """
    reader = open_gguf(path)
    return _tokenizer_from_reader(reader, _display(path))


def read_gguf(path, progress: bool = True):
    """Config, float32 tensors and tokenizer of a GGUF, parsing the file once.

    Returns:
        ``(ParScaleConfig, dict[str, np.ndarray], Tokenizer)`` as :func:`read_gguf_config`,
        :func:`read_gguf_tensors` and :func:`read_gguf_tokenizer` return them.

    Raises:
        what those three raise.
    """
    reader = open_gguf(path)
    return read_gguf_config(reader), read_gguf_tensors(reader, progress=progress), read_gguf_tokenizer(reader)


def _tokenizer_from_reader(reader, path):
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    from parscale_edge.tokenizer import Tokenizer

    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{path}: the GGUF carries no tokenizer (no tokenizer.ggml.model key)")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer model {model!r} is not supported; parscale-edge rebuilds "
                         f"only byte-level BPE ('gpt2') tokenizers from GGUF. Point it at the Hugging Face "
                         f"folder (tokenizer.json) instead")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens") or []
    merges_raw: list[str] = _field(reader, "tokenizer.ggml.merges") or []
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens:
        raise ValueError(f"{path}: tokenizer.ggml.tokens is empty")
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicate string keeps its first id
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"{path}: malformed BPE merge {m!r}")
        merges.append((a, b))
    bpe = BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
              end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    hf = HFTokenizer(bpe)

    pre = _field(reader, "tokenizer.ggml.pre") or "default"
    if pre == "smollm":
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ("qwen2", "llama-bpe", "llama3"):
        pattern = QWEN2_PATTERN if pre == "qwen2" else LLAMA3_PATTERN
        if pre == "qwen2":
            hf.normalizer = normalizers.NFC()
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in ("gpt2", "default"):
            warnings.warn(f"{path}: unknown tokenizer.ggml.pre {pre!r}; using the GPT-2 split rule, "
                          f"token ids may differ from the original tokenizer", stacklevel=3)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()

    added = []
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty in (3, 4) and vocab.get(tok) == i:
            added.append(AddedToken(tok, special=(ty == 3), normalized=False, single_word=False,
                                    lstrip=False, rstrip=False))
    # add_tokens keeps the ids the BPE vocab already gives these strings.
    hf.add_tokens([a for a in added if not a.special])
    hf.add_special_tokens([a for a in added if a.special])

    def tok_of(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = tok_of("tokenizer.ggml.bos_token_id"), tok_of("tokenizer.ggml.eos_token_id")
    pad, unk = tok_of("tokenizer.ggml.padding_token_id"), tok_of("tokenizer.ggml.unknown_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        b = f"{bos}:0 " if add_bos else ""
        e = f" {eos}:0" if add_eos else ""
        specials = ([(bos, vocab[bos])] if add_bos else []) + ([(eos, vocab[eos])] if add_eos and eos != bos else [])
        hf.post_processor = processors.TemplateProcessing(single=f"{b}$A:0{e}", pair=f"{b}$A:0{e} {b}$B:1{e}",
                                                          special_tokens=specials)
    else:
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
    template = _field(reader, "tokenizer.chat_template")
    ctx = _field(reader, f"{_field(reader, 'general.architecture')}.context_length")
    config = {"add_bos_token": add_bos, "add_eos_token": add_eos, "model_max_length": int(ctx) if ctx else None}
    return Tokenizer(hf, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, chat_template=template,
                     config={k: v for k, v in config.items() if v is not None})
