"""The contract between an exported folder and the runtime (no torch, no onnxruntime here).

An export folder holds::

    model.onnx            decoder graph (inputs/outputs below)
    model.onnx.data       weights as external data, referenced by a relative location
    manifest.json         :class:`Manifest` (P, shapes, eos ids, precision, source and its hash)
    tokenizer.json, tokenizer_config.json (chat template), generation_config.json

Two graphs (``Manifest.graph``), both writing the cache tensors in the dtype ``Manifest.cache_dtype``
names (float32 for fp32 and quantized exports, float16 for fp16, bfloat16 for bf16; int8 for a fused
graph rewritten by ``parscale quantize --kv-cache int8``, see :data:`KV_INT8`) and ``logits`` in
float32 for every precision (B user rows, S new tokens, P streams):

``reference`` (parscale_edge.export.onnx_export: the TorchScript trace; prefix and aggregator inside the graph).
Inputs (:data:`REFERENCE_STEP_INPUTS`, then :func:`past_names`): ``input_ids`` int64 [B, S];
``attention_mask`` int64 [B, past+S] (1 = real token); ``position_ids`` int64 [B, S];
``past_key_values.{i}.key`` / ``.value`` [P*B, kv_heads, past, head_dim].
Outputs: ``logits`` [B, S, vocab]; ``present.{i}.key`` / ``.value`` [P*B, kv_heads, past+S, head_dim].
Cache rows are stream-major (row p*B + b; :data:`CACHE_ROW_ORDER`, :func:`cache_row`).

``fused`` (parscale_edge.export.onnx_builder: GroupQueryAttention over one preallocated cache bound as both past
and present; format 3). With N = P*B cache rows, C cache slots, K gathered positions, M prefix rows,
inputs (:func:`graph_inputs`): :data:`FUSED_STEP_INPUTS` ``input_ids`` int64 [B, S] (right-padded);
``seqlens_k`` int32 [B] (cache tokens after the step, prefix included, minus 1);
``total_sequence_length`` int32 [] (M + S on a first prompt, else C); ``logits_index`` int64 [B, K];
then :data:`AGG_INPUTS` float32 (``w1`` [P*H, A], ``b1`` [A], ``w2`` [A, P], ``b2`` [P], ``smooth`` [];
A = H, or 1 for P = 1);
``past_key_values.{i}.key`` / ``.value`` [N, kv_heads, C, head_dim] (each bound to the same buffer
as the matching ``present``); :func:`prefix_row_names` [N, M, (heads + 2*kv_heads)*head_dim];
:data:`ROPE_INPUTS` [>= C, head_dim/2] (:func:`rope_tables`); the cache of the cache dtype, prefix
rows and RoPE tables of the compute dtype (:attr:`Manifest.compute_dtype`: the cache dtype of a float
cache, the graph's float type beside an int8 cache). Outputs: ``logits`` [B, K, vocab];
``present.{i}.*`` (the past's buffer). Cache rows are batch-major (row b*P + p); the first n_prefix
slots of stream p's rows hold its ParScale prefix (at most :data:`MAX_PREFIX_SLOTS`); the parts of
each P > 1 live in the part file ``parallel_options[P]`` (a parscale_edge.adapter file: prefixes,
aggregator, smoothing). docs/parscale.md has the semantics.

An int8 KV cache (fused graphs only, :data:`KV_INT8`; ``cache_dtype`` "int8", the field ``kv_cache``
records how): every GroupQueryAttention node carries ``k_quant_type``/``v_quant_type``
(``kv_cache["quant"]``, PER_CHANNEL or PER_TENSOR), ``kv_cache_bit_width`` 8 and its static scales as
initializers (inputs 12 and 13: ``kv_scale.{i}.key`` / ``.value`` float32, [kv_heads, 1, head_dim]
per channel, [1] per tensor; dequantized value = int8 * scale). The runtime feeds nothing new and
writes no prefix into the cache: a first prompt's prefix rows (compute dtype) are quantized by
GroupQueryAttention itself, so every first prompt, even of one token, carries them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
#: 2: fused graphs (GroupQueryAttention, ParScale parts as inputs); 3: fused graphs without
#: GroupQueryAttention's ``query_seqlens`` (onnxruntime 1.31, the GPU build): a prefill is a first
#: prompt that carries the ParScale prefix as rows in front of the chunk (:func:`prefix_row_names`)
FORMAT_VERSION = 3
#: export precision -> dtype of the KV cache inputs/outputs (ONNX / numpy name); logits are always float32.
CACHE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: ``cache_dtype`` of a fused graph whose KV cache is int8 with static scales (``Manifest.kv_cache``:
#: {"dtype": "int8", "quant": "PER_CHANNEL" | "PER_TENSOR", "compute_dtype": float32 | float16,
#: "scale_margin": float, "calibration": {...}}); the compute dtype is that of the prefix rows and
#: RoPE tables (and of the attention query).
KV_INT8 = "int8"
#: model.onnx metadata key: JSON {packed MatMul node name: output widths of its parts} (fused graphs)
PACKED_WIDTHS_KEY = "packed_widths"
#: model.onnx metadata key, "1" when every weight MatMul of the graph reads 2-D token rows [N*S, in]
#: (fused graphs; the quantizer then writes each GGUF Q4_1 correction as one Gemm)
TOKEN_ROWS_KEY = "token_rows_2d"


#: Fused graphs: inputs carrying the ParScale aggregator (the MLP of the paper's Sec. 2 "aggregate"),
#: float32: w1 [P*H, A], b1 [A], w2 [A, P], b2 [P], and the smoothing epsilon [] of that P's parts
#: (weights = (1 - eps) * softmax + eps / P; adapters and conversions use 0.1, the authors' class
#: default is 0.01, so it is fed per P, never baked into the shared backbone).
AGG_INPUTS = ("parscale.aggregate.w1", "parscale.aggregate.b1", "parscale.aggregate.w2", "parscale.aggregate.b2",
              "parscale.aggregate.smooth")
#: Fused graphs: prefix slots a request may hold on top of the context (authors: 48 prefix tokens).
MAX_PREFIX_SLOTS = 128
#: Fused graphs: GroupQueryAttention's RoPE tables, graph inputs [slots, head_dim/2] of the compute dtype,
#: indexed by cache slot: identity rows for the n prefix slots, then position p at slot n + p
#: (:func:`rope_tables`). GroupQueryAttention then takes every position from the slot.
ROPE_INPUTS = ("rope.cos_cache", "rope.sin_cache")


#: The graph kinds (``Manifest.graph``), each with its KV-cache row order: row ``p*B + b`` holds stream
#: p of user row b in a reference graph (stream-major, as the PyTorch model replicates), row ``b*P + p``
#: in a fused graph (batch-major: one sample's streams are contiguous).
CACHE_ROW_ORDER = {"reference": "stream-major", "fused": "batch-major"}


def cache_row(graph: str, p: int, b: int, P: int, B: int) -> int:
    """The KV-cache row of stream ``p`` (0 <= p < P) of user row ``b`` (0 <= b < B) in a cache of
    P*B rows of graph kind ``graph`` (:data:`CACHE_ROW_ORDER`). Raises KeyError for another kind."""
    return {"reference": p * B + b, "fused": b * P + p}[graph]


def rope_tables(slots: int, n_prefix: int, head_dim: int, theta: float):
    """Fused graphs: the :data:`ROPE_INPUTS` for a cache of ``slots`` slots whose first ``n_prefix``
    hold the ParScale prefix: cos and sin, numpy float32 [slots, head_dim/2] (half-split RoPE,
    frequencies theta^(-2i/head_dim) as in the dense model; a runtime feeds them in the compute dtype,
    :attr:`Manifest.compute_dtype`).

    GroupQueryAttention rotates the token in cache slot s by row s. Rows 0..n_prefix-1 are the
    identity (cos 1, sin 0 exactly), so prefix keys enter the cache unrotated (the authors' prefix
    takes no position); row n_prefix + p rotates by position p, so real tokens keep the positions
    0..S-1 of the dense model whatever P is (docs/parscale.md, "positions")."""
    import numpy as np

    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    freqs = np.arange(max(0, slots - n_prefix), dtype=np.float32)[:, None] * inv_freq[None]
    ident = np.zeros((min(slots, n_prefix), head_dim // 2), np.float32)
    return (np.concatenate([ident + 1.0, np.cos(freqs)]).astype(np.float32),
            np.concatenate([ident, np.sin(freqs)]).astype(np.float32))


def prefix_row_names(num_layers: int) -> list[str]:
    """Fused graphs: ``parscale.prefix_rows.{i}``, one per layer, [P*B, M, (heads + 2*kv_heads)*head_dim]
    of the compute dtype (:attr:`Manifest.compute_dtype`). A first prompt (a chunk into a cache holding
    only the prefix) feeds M = n_prefix rows per stream, zero queries then the stream's prefix keys and
    values, which GroupQueryAttention writes into the first cache slots; every other step feeds M = 0
    rows (the prefix is in the cache)."""
    return [f"parscale.prefix_rows.{i}" for i in range(num_layers)]


#: Reference graphs: the inputs in front of the cache, in graph order.
REFERENCE_STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
#: Fused graphs: the inputs in front of :data:`AGG_INPUTS`, in graph order.
FUSED_STEP_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "logits_index")


def graph_inputs(graph: str, num_layers: int) -> list[str]:
    """Every input name of a ``graph`` (``reference`` or ``fused``) graph, in graph order.
    Raises ValueError for another graph kind."""
    if graph not in CACHE_ROW_ORDER:
        raise ValueError(f"unknown graph kind {graph!r} (reference or fused)")
    if graph == "reference":
        return [*REFERENCE_STEP_INPUTS, *past_names(num_layers)]
    return [*FUSED_STEP_INPUTS, *AGG_INPUTS, *past_names(num_layers), *prefix_row_names(num_layers), *ROPE_INPUTS]


def graph_outputs(num_layers: int) -> list[str]:
    """Every output name, in graph order, for both graph kinds: ``logits`` then :func:`present_names`."""
    return ["logits", *present_names(num_layers)]


def past_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key``, ``.value`` for every layer, in graph input order."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """``present.{i}.key``, ``.value`` for every layer, in graph output order."""
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


class ManifestError(ValueError):
    """An export folder is missing files or its manifest is unreadable."""


@dataclass
class Manifest:
    """What a runtime needs to drive the graph without knowing the model's code."""

    parscale_n: int
    parscale_n_tokens: int
    num_layers: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    eos_token_ids: list[int]
    precision: str
    source: str
    source_sha256: str
    family: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    opset: int
    format_version: int = FORMAT_VERSION
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    tokenizer_vocab_size: int | None = None  # tokens of the exported tokenizer.json (checked at load)
    quantization: dict[str, Any] | None = None  # settings and measured cost, written by `parscale quantize`
    #: "reference" (TorchScript trace: concatenated cache, prefix and aggregator inside) or "fused"
    #: (parscale_edge.export.onnx_builder: GroupQueryAttention, shared KV buffer, ParScale parts as inputs).
    graph: str = "reference"
    #: fused graphs: P -> ParScale part file (relative path; None for P = 1, the plain backbone).
    parallel_options: dict[str, str | None] | None = None
    rope_theta: float | None = None
    cache_dtype: str = "float32"  # past_key_values.* / present.* element type: float32, float16, bfloat16, int8
    #: int8 KV caches (cache_dtype "int8"): {"dtype": "int8", "quant", "compute_dtype", "scale_margin",
    #: "calibration"} (:data:`KV_INT8`); None for a float cache
    kv_cache: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def compute_dtype(self) -> str:
        """The float type of the fused graph's ``parscale.prefix_rows.*`` and ``rope.*`` inputs (and of
        attention): ``cache_dtype`` for a float cache; for an int8 one, ``kv_cache["compute_dtype"]``
        (float32 or float16)."""
        return self.kv_cache["compute_dtype"] if self.cache_dtype == KV_INT8 else self.cache_dtype

    def parallel_choices(self) -> list[int]:
        """The P this folder can run, ascending: the keys of ``parallel_options`` (fused graphs),
        else the one P it was exported with."""
        return sorted(int(k) for k in self.parallel_options) if self.parallel_options else [self.parscale_n]

    def part_file(self, P: int) -> str | None:
        """P's ParScale part file, relative to the folder (fused graphs, P > 1), else None."""
        return (self.parallel_options or {}).get(str(P))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Manifest":
        """Read ``manifest.json`` from an export folder.

        Raises ManifestError naming the folder when the file is missing, malformed or fails
        :func:`_validate` (wrong types, unknown graph or precision, a cache dtype that does not
        match, part files outside the folder)."""
        p = Path(folder) / MANIFEST_FILE
        if not p.exists():
            raise ManifestError(f"{folder}: no {MANIFEST_FILE}; this is not a parscale-edge export folder "
                                "(create one with `parscale export MODEL -o DIR`)")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{p}: unreadable manifest ({e}); re-export the model") from None
        except OSError as e:
            raise ManifestError(f"{p}: cannot read the manifest ({e.strerror}); check the file's permissions") from None
        _validate(d, p)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: manifest fields that must be positive integers
_POSITIVE_INTS = ("parscale_n", "num_layers", "num_key_value_heads", "head_dim", "hidden_size", "vocab_size",
                  "max_position_embeddings", "opset", "format_version")
_PRECISIONS = (*CACHE_DTYPES, "int4", "int8", "int8-dynamic")


def _validate(d, p: Path) -> None:
    """Raise ManifestError (one line naming ``p``, the field and the fix) unless the parsed manifest
    ``d`` is a JSON object with every required field of the right type and range, a known graph kind
    and precision, a cache dtype that matches the precision, and ParScale part files that are
    relative paths inside the folder (never ``..``, absolute paths or links out of it)."""
    fix = "restore the manifest.json written with this model, or re-export it"

    def bad(what: str):
        raise ManifestError(f"{p}: {what}; {fix}")

    if not isinstance(d, dict):
        bad(f"the manifest is a JSON {type(d).__name__}, not an object")
    required = [f.name for f in dataclasses.fields(Manifest)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in d]
    if missing:
        bad(f"field(s) {', '.join(missing)} missing")
    for k in _POSITIVE_INTS:
        v = d.get(k, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(f"{k} must be a positive integer, got {v!r}")
    if not isinstance(d.get("parscale_n_tokens"), int) or d["parscale_n_tokens"] < 0:
        bad(f"parscale_n_tokens must be an integer >= 0, got {d.get('parscale_n_tokens')!r}")
    eos = d["eos_token_ids"]
    if not isinstance(eos, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t for t in eos):
        bad(f"eos_token_ids must be a list of token ids, got {eos!r}")
    for k in ("tie_word_embeddings",):
        if not isinstance(d[k], bool):
            bad(f"{k} must be true or false, got {d[k]!r}")
    for k in ("source", "source_sha256", "family"):
        if not isinstance(d[k], str):
            bad(f"{k} must be a string, got {d[k]!r}")
    graph = d.get("graph", "reference")
    if graph not in CACHE_ROW_ORDER:
        bad(f"unknown graph kind {graph!r} (reference or fused)")
    prec = d["precision"]
    if prec not in _PRECISIONS:
        bad(f"unknown precision {prec!r} ({', '.join(_PRECISIONS)})")
    cache = d.get("cache_dtype", "float32")
    want = (CACHE_DTYPES[prec],) if prec in CACHE_DTYPES else ("float32", "float16")
    kv = d.get("kv_cache")
    if cache == KV_INT8:
        if graph != "fused":
            bad("an int8 KV cache needs a fused graph")
        if not isinstance(kv, dict) or kv.get("dtype") != KV_INT8 \
                or kv.get("quant") not in ("PER_CHANNEL", "PER_TENSOR"):
            bad("cache_dtype int8 needs kv_cache {\"dtype\": \"int8\", \"quant\": PER_CHANNEL or PER_TENSOR, ...}")
        if kv.get("compute_dtype") not in want:
            bad(f"kv_cache compute_dtype {kv.get('compute_dtype')!r} does not match precision {prec} "
                f"({' or '.join(want)})")
    elif cache not in want:
        bad(f"cache_dtype {cache!r} does not match precision {prec} (its KV cache is {' or '.join(want)}"
            f"{' or int8' if graph == 'fused' else ''})")
    elif kv is not None:
        bad(f"kv_cache is set but cache_dtype is {cache!r} (kv_cache describes an int8 cache only)")
    if d.get("quantization") is not None and not isinstance(d["quantization"], dict):
        bad("quantization must be an object")
    if "extra" in d and not isinstance(d["extra"], dict):
        bad("extra must be an object")
    opts = d.get("parallel_options")
    if opts is None:
        if graph == "fused":
            bad("a fused graph needs parallel_options (P -> ParScale part file)")
        return
    if not isinstance(opts, dict) or not opts:
        bad(f"parallel_options must be an object P -> part file, got {opts!r}")
    if str(d["parscale_n"]) not in opts:
        bad(f"parallel_options {sorted(opts)} lacks the default P={d['parscale_n']}")
    folder = p.parent.resolve()
    for k, rel in opts.items():
        if not k.isdigit() or int(k) < 1:
            bad(f"parallel_options key {k!r} is not a P >= 1")
        if rel is None:
            if int(k) != 1:
                bad(f"parallel_options gives P={k} no part file")
            continue
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts \
                or folder not in (folder / rel).resolve().parents:
            bad(f"parallel_options P={k} names {rel!r}, which is not a file inside the folder; a manifest's paths "
                "stay in its folder")


#: the fix that ends most messages about a damaged export folder
REEXPORT_HINT = "re-export it with `parscale export MODEL -o DIR`"


class ExportFolderError(ManifestError):
    """A file of an export folder is truncated, inconsistent with the others, or too large to load
    (raised by :mod:`parscale_edge.validate` and :func:`parscale_edge.tokenizer.check_tokenizer`)."""
