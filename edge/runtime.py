"""Run an exported ParScale model with ONNX Runtime: prefill, decode with a KV cache, sampling.

Importable without torch: needs onnxruntime, numpy and (for text) the ``tokenizers`` package.
The hot loop is :meth:`OnnxCausalLM.generate_tokens`: one prefill call, then one decode call per
new token, each feeding the previous ``present`` tensors back as ``past_key_values``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .kv_cache import KVCache, cache_host_array, cache_types, tensor_shape
from .manifest import (AGG_INPUTS, FORMAT_VERSION, KV_INT8, MAX_PREFIX_SLOTS, MODEL_FILE, REFERENCE_STEP_INPUTS,
                       ROPE_INPUTS, Manifest, ManifestError, graph_outputs, past_names, prefix_row_names, present_names,
                       rope_tables)
from .validate import check_export_folder, check_kv_memory

#: The oldest ONNX Runtime the fused graph is tested on: .ci/ort_compat.sh runs the fused-graph tests
#: under 1.31.1 (onnxruntime-gpu's newest release as this is written), the main suite under 1.32.
#: (1.30.0 passed a spot check on tiny fp32 models; it is not tested, so it is refused.)
FUSED_MIN_ORT = (1, 31)


def ort_version(version: str) -> tuple[int, int]:
    """(major, minor) of an ONNX Runtime version string ("1.32.0", "1.33.0.dev20260101")."""
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def request_capacity(prompt_tokens: int, max_new_tokens: int, context: int) -> int:
    """Cache slots per row (prefix not counted) that :meth:`OnnxCausalLM.prefill` allocates for a
    prompt of ``prompt_tokens`` and up to ``max_new_tokens`` new tokens, capped by the context."""
    return min(context, prompt_tokens + max(1, max_new_tokens))


def _load_failure(path: Path, error: str, ort_version: str) -> str:
    """One line for an ONNX Runtime session that could not load ``path``: a graph newer than this
    onnxruntime (opset or IR version) asks for a newer onnxruntime; anything else for a re-export.
    ORT's text is shortened at a sentence end (its C++ signature prefix dropped), never mid-word."""
    import re

    text = " ".join(error.split())
    found = re.findall(r"(Opset \d+ is under development|Current official support for domain \S+ is till opset "
                       r"\d+|Unsupported model IR version: \d+, max supported IR version: \d+)", text)
    if found:
        return (f"{path} was made for a newer ONNX Runtime than this one (onnxruntime {ort_version}: "
                f"{'; '.join(found)}); upgrade it: pip install -U onnxruntime (or onnxruntime-gpu)")
    text = re.sub(r"^.*?\) (?=[A-Z])", "", text) if ") " in text[:400] else text  # drop "file.cc:12 void f(...)"
    if len(text) > 300:
        cut = text[:300].rfind(". ")
        text = text[:cut + 1] if cut > 80 else text[:300].rsplit(" ", 1)[0] + " ..."
    return (f"{path}: ONNX Runtime cannot load the model ({text}); the file or its model.onnx.data is missing or "
            "corrupt: copy the folder again or re-export it")


class RuntimeInputError(ValueError):
    """Inputs that the graph cannot run on (wrong shapes, batch sizes, lengths)."""


def select_providers(device: str = "auto") -> list:
    """ONNX Runtime execution providers for ``device`` in ``auto|cpu|cuda`` (see :mod:`parscale_edge.providers`).

    ``auto`` takes CUDA only when onnxruntime-gpu lists it *and* a probe session runs on it; a
    CUDA entry comes with its options, ``("CUDAExecutionProvider", {...})``. Otherwise CPU, with
    one warning per process when CUDA was requested or listed but does not work. Raises
    ValueError for another device name.
    """
    from .providers import select

    return select(device)


@dataclass
class SamplingConfig:
    """Decoding settings. ``temperature`` 0 (or ``do_sample=False``) is greedy; ``top_k`` 0 and
    ``top_p`` 1.0 disable those filters; ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def asked(cls, max_new_tokens: int = 128, temperature: float | None = None, do_sample: bool = False,
              top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> SamplingConfig:
        """The settings a user asks for: greedy unless ``do_sample``, a ``temperature`` other than 0,
        ``top_k`` or ``top_p`` < 1 asks for sampling; the temperature is then 1 unless given
        (``temperature=0`` stays greedy). Raises ValueError as the constructor does."""
        sample = bool(do_sample or top_k or top_p < 1.0 or (temperature is not None and temperature != 0))
        t = temperature if temperature is not None else 1.0 if sample else 0.0
        return cls(max_new_tokens=max_new_tokens, do_sample=sample and t > 0, temperature=t, top_k=top_k,
                   top_p=top_p, seed=seed)


def sample_next(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """Pick one token per row. logits: float [B, vocab] -> int64 [B]."""
    if cfg.greedy:
        return logits.argmax(-1).astype(np.int64)
    x = logits.astype(np.float64)
    x = (x - x.max(-1, keepdims=True)) / cfg.temperature  # max first: a tiny temperature gives -inf, never inf-inf
    k = min(cfg.top_k, x.shape[-1])
    if k:
        kth = np.partition(x, -k, axis=-1)[:, -k][:, None]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < cfg.top_p  # always keeps the top token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids), each int64 [B, S_max].

    position_ids = clamp(cumsum(mask) - 1, 0): real tokens keep positions 0..len-1, exactly as when
    each prompt runs alone (required for P > 1, docs/parscale.md "Padding").
    Raises RuntimeInputError for an empty prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RuntimeInputError("every prompt needs at least one token")
    S = max(len(p) for p in prompts)
    ids = np.full((len(prompts), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), S), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = p
        mask[b, S - len(p):] = 1
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None).astype(np.int64)
    return ids, mask, pos


class DecodeState:
    """What one request holds between graph calls: its :class:`parscale_edge.kv_cache.KVCache`
    (``cache``: tensors, row order, prefix slots, per-row lengths, placement) and the graph inputs
    bound or fed beside it.

    Fused graphs: the cache is preallocated and bound once to ONNX Runtime as both ``past`` and
    ``present`` (``binding``, IO binding), so a decode step allocates nothing that grows with the
    generated length; ``decode_io`` (CPU) holds the decode step's small input and logits arrays,
    bound once; ``prefix_rows`` are the per-layer [P, n_prefix, .] rows a first prompt feeds;
    ``rope`` the cos/sin OrtValues bound for this cache (:func:`parscale_edge.manifest.rope_tables`).
    Reference graphs: ``mask`` the attention mask so far, int64 [B, tokens]; ``positions`` the last
    position per row, int64 [B, 1]. :meth:`close` drops the cache (generators call it in ``finally``)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.batch, self.P = cache.batch, cache.P
        self.mask: np.ndarray | None = None
        self.positions: np.ndarray | None = None
        self.binding = None
        self.decode_io: dict[str, np.ndarray] | None = None
        self.decode_bound = False
        self.prefix_rows: list[np.ndarray] = []
        self.rope: list = []

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (the cache is gone)."""
        return self.cache.closed

    def close(self) -> None:
        """Free the cache now (idempotent)."""
        self.cache.close()
        self.binding, self.decode_io, self.rope = None, None, []


class OnnxCausalLM:
    """An export folder loaded into an ONNX Runtime session.

    Two graph kinds (``manifest.graph``): ``fused`` (:mod:`parscale_edge.export.onnx_builder`, the default export:
    GroupQueryAttention over a preallocated KV cache bound with IO binding, ParScale parts as inputs
    so one backbone serves several P) and ``reference`` (the TorchScript trace: the cache is
    concatenated and copied back every step). Both give the same tokens; :meth:`prefill` /
    :meth:`decode` / :meth:`score` / :meth:`generate_tokens` work on either.

    Args:
        folder: a folder written by ``parscale export`` (see :mod:`parscale_edge.manifest`).
        model_file: the graph file inside ``folder`` (another graph over the same weights, for checks).
        device: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda``.
        threads: intra-op threads (None: ONNX Runtime's default, all cores).
        parallel: default P for fused graphs (one of :attr:`parallel_choices`; default the manifest's).
    Raises:
        ManifestError: not an export folder, model.onnx / its data file / a ParScale part file missing,
            a bf16 export on another provider than CUDA (ONNX Runtime runs bfloat16 on CUDA only), or a
            fused graph on an onnxruntime older than :data:`FUSED_MIN_ORT`.
    """

    def __init__(self, folder: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 model_file: str = MODEL_FILE, parallel: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        path = self.folder / model_file
        if not path.exists():
            raise ManifestError(f"{self.folder}: {MODEL_FILE} is missing; re-export the model")
        check_export_folder(self.folder, self.manifest, model_file)  # truncated files, foreign manifest, memory
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.manifest.graph == "fused" and ort_version(ort.__version__) < FUSED_MIN_ORT:
            raise ManifestError(f"{self.folder} is a fused graph, which needs onnxruntime >= "
                                f"{'.'.join(map(str, FUSED_MIN_ORT))}; this is onnxruntime {ort.__version__}: "
                                "upgrade onnxruntime, or export with --graph reference")
        if self.manifest.graph == "fused" and self.manifest.format_version < FORMAT_VERSION:
            raise ManifestError(f"{self.folder} is a fused graph of export format {self.manifest.format_version} "
                                f"(GroupQueryAttention's query_seqlens, onnxruntime >= 1.32 only); this parscale-edge "
                                f"runs format {FORMAT_VERSION}: export the model again")
        self.providers = select_providers(device)
        first = self.providers[0] if isinstance(self.providers[0], str) else self.providers[0][0]
        if self.manifest.cache_dtype == "bfloat16" and first != "CUDAExecutionProvider":
            raise ManifestError(f"{self.folder} is a bf16 export, which ONNX Runtime runs on its CUDA provider only "
                                f"(this session would run on {first}); use --device cuda on an NVIDIA GPU with "
                                "onnxruntime-gpu, or export --precision fp16 or fp32 for the CPU")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            if self.manifest.cache_dtype == KV_INT8:
                raise ManifestError(f"{path} keeps its KV cache in int8 (GroupQueryAttention k_quant_type/"
                                    f"kv_cache_bit_width), which onnxruntime {ort.__version__} cannot load: "
                                    f"{' '.join(str(e).split())[:160]}; re-export or re-quantize it without "
                                    "--kv-cache int8 (or use onnxruntime >= 1.31)") from None
            raise ManifestError(_load_failure(path, str(e), ort.__version__)) from None
        m = self.manifest
        self.fused = m.graph == "fused"
        self.L = m.num_layers
        self._past_names = past_names(self.L)
        self._present_names = present_names(self.L)
        self._prefix_names = prefix_row_names(self.L) if self.fused else []
        self._outputs = graph_outputs(self.L)
        self._tokenizer = None
        self._ort = ort
        # the provider the session really uses (a CUDA entry of select_providers is a (name, options) tuple)
        self._device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if self.fused and self._device == "cuda" and m.compute_dtype == "float32":
            import warnings

            warnings.warn(f"{self.folder} is a float32 fused graph: ONNX Runtime's CUDA GroupQueryAttention runs in "
                          "float16/bfloat16 only, so attention falls back to the CPU with the cache copied every step; "
                          "export --precision fp16 (or bf16) for CUDA", stacklevel=2)
        self._parts: dict[int, dict] = {}
        self.parallel_choices = m.parallel_choices()
        self.P = m.parscale_n if parallel is None else int(parallel)
        self._check_parallel(self.P)

    def _check_parallel(self, P: int) -> int:
        if P not in self.parallel_choices:
            raise RuntimeInputError(f"{self.folder} has no ParScale parts for P={P}; it offers P in "
                                    f"{self.parallel_choices} (add an adapter with `parscale export --adapter`)")
        return P

    # ------------------------------------------------------------------ fused graphs: ParScale parts
    def _parallel_parts(self, P: int) -> dict:
        """Aggregator inputs (float32 OrtValues on the session's device) and per-layer prefixes
        (host arrays in the cache's host representation, :func:`cache_host_array`: the part files
        are float32, a half-precision cache gets them rounded) for P, loaded once from the folder."""
        if P in self._parts:
            return self._parts[P]
        H, L = self.manifest.hidden_size, self.L
        rel = self.manifest.part_file(P)

        def width1_aggregator() -> list[np.ndarray]:
            # P = 1: softmax over one stream is exactly 1. Zeros of the narrowest aggregator the graph
            # takes (width 1; exports before the width was a dynamic dimension declare H)
            w1 = next(i for i in self.session.get_inputs() if i.name == AGG_INPUTS[0])
            A = w1.shape[1] if isinstance(w1.shape[1], int) else 1
            return [np.zeros((H, A), np.float32), np.zeros(A, np.float32), np.zeros((A, 1), np.float32),
                    np.zeros(1, np.float32), np.zeros((), np.float32)]

        if rel is None:  # P = 1: the plain backbone
            agg = width1_aggregator()
            prefix: list[tuple[np.ndarray, np.ndarray]] = []
            n = 0
        else:  # P > 1, or the P = 1 prefix-tuning control (prefixes, no aggregator tensors)
            from safetensors import SafetensorError, safe_open
            from safetensors.numpy import load_file

            f = self.folder / rel
            try:
                t = load_file(str(f))
                if P == 1:
                    agg = width1_aggregator()
                else:
                    with safe_open(str(f), "numpy") as fh:
                        smooth = float((fh.metadata() or {})["parscale_attn_smooth"])
                    agg = [np.ascontiguousarray(t["model.aggregate_layer.0.weight"].T), t["model.aggregate_layer.0.bias"],
                           np.ascontiguousarray(t["model.aggregate_layer.2.weight"].T), t["model.aggregate_layer.2.bias"],
                           np.array(smooth, np.float32)]
                prefix = [(t[f"model.layers.{i}.self_attn.prefix_k"], t[f"model.layers.{i}.self_attn.prefix_v"])
                          for i in range(L)]
            except (OSError, SafetensorError, KeyError, ValueError) as e:
                raise ManifestError(f"{f}: ParScale parts for P={P} are missing or unreadable ({e}); re-export "
                                    "the model or re-add the adapter") from None
            if agg[3].shape != (P,) or prefix[0][0].shape[0] != P:
                raise ManifestError(f"{f}: holds parts for P={prefix[0][0].shape[0]}, the manifest says P={P}; re-export")
            n = prefix[0][0].shape[2]
            dt = self.manifest.compute_dtype  # an int8 cache: the prefix rows quantize in the graph
            prefix = [(cache_host_array(k, dt), cache_host_array(v, dt)) for k, v in prefix]
        ov = self._ort.OrtValue.ortvalue_from_numpy
        parts = {"P": P, "n_prefix": n, "prefix": prefix, "rows": self._prefix_rows(prefix, P),
                 "agg": {name: ov(np.ascontiguousarray(a, dtype=np.float32), self._device, 0)
                         for name, a in zip(AGG_INPUTS, agg)}}
        self._parts[P] = parts
        return parts

    def _prefix_rows(self, prefix: Sequence[tuple[np.ndarray, np.ndarray]], P: int) -> list[np.ndarray]:
        """Per layer, the rows a first prompt feeds as ``parscale.prefix_rows.{i}`` for one sample:
        [P, n, (heads + 2*kv_heads)*head_dim] in the compute dtype's host representation, packed like the
        graph's q|k|v (zero queries, then stream p's prefix keys and values, head-major); [P, 0, .]
        for P = 1 (:func:`parscale_edge.manifest.prefix_row_names`)."""
        m = self.manifest
        width = next(i for i in self.session.get_inputs() if i.name == self._prefix_names[0]).shape[2]
        kvw = m.num_key_value_heads * m.head_dim
        host = cache_types(m.compute_dtype)[1]
        if not prefix:
            return [np.zeros((P, 0, width), host)] * self.L
        rows = []
        for k, v in prefix:  # [P, kv_heads, n, head_dim] -> [P, n, kv_heads*head_dim]
            n = k.shape[2]
            r = np.zeros((P, n, width), host)
            r[:, :, width - 2 * kvw:width - kvw] = k.transpose(0, 2, 1, 3).reshape(P, n, kvw)
            r[:, :, width - kvw:] = v.transpose(0, 2, 1, 3).reshape(P, n, kvw)
            rows.append(r)
        return rows

    def _check_token_ids(self, input_ids: np.ndarray) -> None:
        """Raises RuntimeInputError for ids outside [0, vocab): the embedding Gather would read
        another row for a negative id and fail inside ONNX Runtime for a large one."""
        V = self.manifest.vocab_size
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= V):
            raise RuntimeInputError(f"token ids must be in [0, {V}) for this model; got {int(input_ids.min())}.."
                                    f"{int(input_ids.max())}")

    def prefix_slots(self, P: int | None = None) -> int:
        """KV-cache slots per stream that the ParScale prefix of P (default :attr:`P`) takes in a
        fused graph's cache; 0 for P = 1 and for reference graphs (their prefix is inside the graph).
        Raises RuntimeInputError for a P this folder has no parts for."""
        P = self._check_parallel(self.P if P is None else int(P))
        return self._parallel_parts(P)["n_prefix"] if self.fused else 0

    def set_parallel(self, P: int) -> None:
        """Make P the default number of streams of later requests (fused graphs: any of
        :attr:`parallel_choices`; the backbone session is shared, only the small ParScale parts differ).
        Raises RuntimeInputError for a P this folder has no parts for."""
        self.P = self._check_parallel(int(P))

    # ----------------------------------------------------------------------------- one graph call
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list | None = None) -> tuple[np.ndarray, list]:
        """Reference graphs: run the graph once (the one reference-graph call; :meth:`prefill`,
        :meth:`decode`, :meth:`score` and the profiler all go through it).

        Args:
            input_ids, position_ids: int64 [B, S]; attention_mask: int64 [B, past+S].
            past: 2*L tensors [P*B, kv_heads, past, head_dim] (rows stream-major) or None for an
                empty cache (:meth:`parscale_edge.kv_cache.KVCache.empty`). numpy arrays run a plain
                ``session.run`` (the cache goes to the host and back every step); OrtValues run with
                IO binding, the present cache staying in the session's device memory (the only way
                to feed a bfloat16 cache).
        Returns:
            logits float32 [B, S, vocab] (on the host) and the present cache: 2*L tensors of past+S
            slots, numpy arrays or OrtValues as ``past``.
        Raises:
            RuntimeInputError: shapes that disagree (the message names both sizes), token ids outside
                the vocabulary, or a fused graph (use :meth:`prefill`/:meth:`decode`/:meth:`score`).
            ManifestError: ``past`` None for a bfloat16 cache (numpy cannot hold one).
        """
        if self.fused:
            raise RuntimeInputError("forward() drives reference graphs; this export is a fused graph: use "
                                    "prefill()/decode() or score()")
        B, S = input_ids.shape
        if past is None:
            past = KVCache.empty(self.manifest, B).tensors
        if len(past) != 2 * self.L:
            raise RuntimeInputError(f"past has {len(past)} tensors; this model needs {2 * self.L} (2 per layer)")
        shapes = [tensor_shape(t) for t in past]
        rows, plen = shapes[0][0], shapes[0][2]
        if rows != self.P * B:
            raise RuntimeInputError(
                f"the KV cache has {rows} rows but input_ids has batch {B}: with P={self.P} streams the "
                f"cache needs P*B = {self.P * B} rows (stream-major). Use a cache from the same batch")
        want = (self.P * B, self.manifest.num_key_value_heads, plen, self.manifest.head_dim)
        bad = next((i for i, shape in enumerate(shapes) if shape != want), None)
        if bad is not None:
            raise RuntimeInputError(f"{self._past_names[bad]} has shape {shapes[bad]}, expected "
                                    f"(P*B, kv_heads, past, head_dim) = {want}")
        self._check_token_ids(input_ids)
        if position_ids.shape != (B, S):
            raise RuntimeInputError(f"position_ids has shape {position_ids.shape}, expected {(B, S)}")
        if attention_mask.shape != (B, plen + S):
            raise RuntimeInputError(f"attention_mask has shape {attention_mask.shape}, expected (B, past+S) = "
                                    f"{(B, plen + S)}")
        feed = dict(zip(REFERENCE_STEP_INPUTS, (input_ids, attention_mask, position_ids)))
        if isinstance(past[0], np.ndarray):
            feed = {k: v.astype(np.int64, copy=False) for k, v in feed.items()}
            feed.update(zip(self._past_names, past))
            out = self.session.run(self._outputs, feed)
            return out[0], out[1:]
        io = self.session.io_binding()
        for name, arr in feed.items():
            io.bind_cpu_input(name, np.ascontiguousarray(arr, dtype=np.int64))
        for name, v in zip(self._past_names, past):
            io.bind_ortvalue_input(name, v)
        io.bind_output("logits", "cpu")
        for name in self._present_names:
            io.bind_output(name, self._device, 0)
        self.session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), list(out[1:])

    def new_state(self, batch: int, capacity: int, parallel: int | None = None) -> DecodeState:
        """An empty request for ``batch`` user rows and up to ``capacity`` tokens per row (prompt +
        new tokens, prefix not counted). Fused graphs allocate the KV cache here, once:
        2*L tensors [P*batch, kv_heads, n_prefix + capacity, head_dim] of ``manifest.cache_dtype``,
        zeros with each stream's prefix (rounded to the cache dtype) in the first n_prefix slots (an
        int8 cache keeps zeros there: the first prompt's prefix rows fill them): numpy arrays on the
        CPU, device OrtValues on CUDA (filled through one reused host staging
        array of one tensor's size, which is dropped afterwards).
        Raises RuntimeInputError for batch < 1 or capacity < 1, parscale_edge.validate.MemoryCheckError
        (before allocating) when the cache would not fit in the available memory."""
        if batch < 1 or capacity < 1:
            raise RuntimeInputError(f"batch and capacity must be >= 1, got {batch} and {capacity}")
        P = self._check_parallel(self.P if parallel is None else int(parallel))
        self._check_kv_memory(batch, capacity, P)
        if not self.fused:
            return DecodeState(KVCache.empty(self.manifest, batch))
        parts = self._parallel_parts(P)
        m, n = self.manifest, parts["n_prefix"]
        if m.rope_theta is None:
            raise ManifestError(f"{self.folder}: the manifest has no rope_theta; export the model again")
        if capacity > m.max_position_embeddings or n > MAX_PREFIX_SLOTS:
            raise RuntimeInputError(f"a request of {capacity} tokens with {n} prefix slots exceeds the model's "
                                    f"context ({m.max_position_embeddings} tokens, at most {MAX_PREFIX_SLOTS} prefix slots)")
        shape = (P * batch, m.num_key_value_heads, n + capacity, m.head_dim)
        int8 = m.cache_dtype == KV_INT8  # values quantized by GroupQueryAttention: no prefix written here
        st = DecodeState(KVCache.allocate(shape, self.L, m.cache_dtype, P, () if int8 else parts["prefix"],
                                          self._device, device_memory=self._device != "cpu", n_prefix=n))
        io = self.session.io_binding()
        for past_name, present_name, v in zip(self._past_names, self._present_names, st.cache.values):
            io.bind_ortvalue_input(past_name, v)
            io.bind_ortvalue_output(present_name, v)  # GroupQueryAttention writes in place
        for name, v in parts["agg"].items():
            io.bind_ortvalue_input(name, v)
        st.rope = [self._ort.OrtValue.ortvalue_from_numpy(cache_host_array(t, m.compute_dtype), self._device, 0)
                   for t in rope_tables(n + capacity, n, m.head_dim, m.rope_theta)]
        for name, v in zip(ROPE_INPUTS, st.rope):
            io.bind_ortvalue_input(name, v)
        st.binding = io
        st.prefix_rows = parts["rows"]
        self._bind_steps(st)
        return st

    def _bind_steps(self, st: DecodeState) -> None:
        """Bind what every step after a first prompt feeds: no prefix rows (the prefix is in the cache)
        and ``total_sequence_length`` = the cache's size, so GroupQueryAttention reads the past."""
        for name, r in zip(self._prefix_names, st.prefix_rows):
            self._bind_cache_input(st.binding, name, np.zeros((st.P * st.batch, 0, r.shape[2]), r.dtype))
        st.binding.bind_cpu_input("total_sequence_length", np.array(st.cache.capacity, dtype=np.int32))

    def _check_kv_memory(self, batch: int, capacity: int, P: int) -> None:
        """The request's KV cache (P*batch rows of prefix + ``capacity`` slots, every layer, key and
        value) fits in the free host memory (CPU sessions; parscale_edge.validate.check_kv_memory)."""
        if self._device != "cpu":
            return
        m = self.manifest
        n = m.parscale_n_tokens if P > 1 or m.part_file(P) else 0  # prefix slots (P = 1: the prefix-only control)
        slots = n + capacity
        check_kv_memory(KVCache.planned_nbytes(m, P, batch, slots),
                        f"P={P} x {batch} row(s) x {slots} slots x {self.L} layers, {m.cache_dtype}",
                        "ask for fewer new tokens (-n / max_new_tokens) or a smaller P")

    def step(self, state: DecodeState, input_ids: np.ndarray, query_lens: np.ndarray | None = None,
             logits_index: np.ndarray | None = None) -> np.ndarray:
        """Fused graphs: append a right-padded chunk to every row and return the requested logits.

        Three kinds of graph call, as GroupQueryAttention allows them on onnxruntime 1.31 and later:
        a chunk into a fresh state (only the prefix in the cache) is a *first prompt* that carries
        the ParScale prefix as rows in front (:func:`parscale_edge.manifest.prefix_row_names`); one token per
        row is a decode step; a later chunk of several tokens runs as one call when the cache has a
        single row (P*B = 1), else token by token through decode steps (GroupQueryAttention takes a
        multi-token chunk after a past for batch 1 only), with the same logits.

        Args:
            input_ids: int64 [B, S]; row b's first ``query_lens[b]`` tokens are real (default all S),
                the rest padding. A row with ``query_lens[b] == 0`` is idle (its length is unchanged;
                a decode step writes a scratch entry into its next free slot, which is never read).
            logits_index: int64 [B, K] positions in the chunk to return logits for (default: each
                row's last real token, K = 1).
        Returns:
            logits float32 [B, K, vocab] (a fresh array).
        Raises:
            RuntimeInputError: batch differs from the state's, the chunk overflows its capacity, or a token
                id is outside the vocabulary.
        """
        if not self.fused:
            raise RuntimeInputError("step() drives fused graphs; use forward() on a reference graph")
        if state.closed or state.binding is None:
            raise RuntimeInputError("this decode state was closed; start a new one with new_state()")
        cache = state.cache
        B, S = input_ids.shape
        self._check_token_ids(input_ids)
        if B != state.batch:
            raise RuntimeInputError(f"input_ids has batch {B} but the KV cache was made for batch {state.batch} "
                                    f"({state.P * state.batch} stream rows with P={state.P}); use a state of the same batch")
        q = np.full(B, S, dtype=np.int64) if query_lens is None else np.asarray(query_lens, dtype=np.int64)
        if int((cache.lengths + S).max()) > cache.capacity:
            raise RuntimeInputError(f"the chunk of {S} tokens does not fit: the cache holds "
                                    f"{cache.capacity - cache.n_prefix} tokens per row and row lengths are "
                                    f"{(cache.lengths - cache.n_prefix).tolist()}; make a state with a larger capacity")
        if logits_index is None:
            logits_index = np.maximum(q - 1, 0)[:, None]
        fresh = bool((cache.lengths == cache.n_prefix).all())
        # an int8 cache holds no prefix until a first prompt brings it: even one token is a first prompt
        first = fresh and (S > 1 or (cache.n_prefix > 0 and cache.cache_dtype == KV_INT8))
        if S > 1 and not fresh:
            if state.P * B > 1 or not 0 <= int(logits_index.max()) < int(q[0]):
                return self._step_tokenwise(state, input_ids, q, logits_index)
            S = int(q[0])  # one cache row: GroupQueryAttention takes its real tokens after the past
            input_ids = input_ids[:, :S]
        io = state.binding
        K = logits_index.shape[1]
        if S == 1 and K == 1 and self._device == "cpu" and not first:
            # decode: small inputs and the logits live in arrays bound once; refill them in place
            d = state.decode_io
            if d is None:
                V = self.manifest.vocab_size
                d = state.decode_io = {"input_ids": np.zeros((B, 1), np.int64), "seqlens_k": np.zeros(B, np.int32),
                                       "logits_index": np.zeros((B, 1), np.int64), "logits": np.zeros((B, 1, V), np.float32)}
            d["input_ids"][:] = input_ids
            d["seqlens_k"][:] = cache.lengths  # the new token's slot; an idle row's scratch entry goes there too
            d["logits_index"][:] = logits_index
            if not state.decode_bound:
                ov = self._ort.OrtValue.ortvalue_from_numpy
                for name in ("input_ids", "seqlens_k", "logits_index"):
                    io.bind_ortvalue_input(name, ov(d[name]))
                io.bind_ortvalue_output("logits", ov(d["logits"]))
                state.decode_bound = True
            self.session.run_with_iobinding(io)
            cache.lengths += q
            return d["logits"].copy()
        state.decode_bound = False
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        if first:  # a first prompt: right-padded rows, the prefix rows in front, nothing read from the cache
            io.bind_cpu_input("seqlens_k", (cache.n_prefix + np.maximum(q, 1) - 1).astype(np.int32))
            io.bind_cpu_input("total_sequence_length", np.array(cache.n_prefix + S, dtype=np.int32))
            rows = [np.ascontiguousarray(np.broadcast_to(r[None], (B, *r.shape)).reshape(B * r.shape[0], *r.shape[1:]))
                    for r in state.prefix_rows]  # [P, n, .] -> [B*P, n, .], batch-major
            for name, r in zip(self._prefix_names, rows):
                self._bind_cache_input(io, name, r)
        else:
            io.bind_cpu_input("seqlens_k", (cache.lengths + np.maximum(q, 1) - 1).astype(np.int32))
        io.bind_cpu_input("logits_index", np.ascontiguousarray(logits_index, dtype=np.int64))
        shape = (B, K, self.manifest.vocab_size)
        if self._device == "cpu":  # ORT writes straight into this array
            out = np.empty(shape, dtype=np.float32)
            io.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(out))
        else:  # a device buffer; only the requested logits travel to the host
            dev = self._ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self._device, 0)
            io.bind_ortvalue_output("logits", dev)
        try:
            self.session.run_with_iobinding(io)
        finally:
            if first:
                self._bind_steps(state)
        cache.lengths = cache.lengths + q
        return out if self._device == "cpu" else dev.numpy()

    def _step_tokenwise(self, state: DecodeState, input_ids: np.ndarray, q: np.ndarray,
                        logits_index: np.ndarray) -> np.ndarray:
        """A multi-token chunk after a past with several cache rows, as one decode step per token
        (:meth:`step`'s third case): row b takes part in the first ``q[b]`` steps. Returns the
        logits of ``logits_index`` float32 [B, K, vocab]; positions past a row's real tokens hold
        the logits of a scratch step."""
        B, S = input_ids.shape
        K = logits_index.shape[1]
        if logits_index.min() < 0 or logits_index.max() >= S:
            raise RuntimeInputError(f"logits_index must be positions in the chunk, 0..{S - 1}; got "
                                    f"{int(logits_index.min())}..{int(logits_index.max())}")
        out = np.empty((B, K, self.manifest.vocab_size), dtype=np.float32)
        for t in range(S):
            logits = self.step(state, input_ids[:, t:t + 1], (q > t).astype(np.int64), np.zeros((B, 1), np.int64))
            b, k = np.nonzero(logits_index == t)
            out[b, k] = logits[b, 0]
        return out

    def _bind_cache_input(self, io, name: str, host: np.ndarray) -> None:
        """Bind a host array of the cache's representation (uint16 bits for bfloat16) as input ``name``."""
        if host.dtype == np.uint16:
            io.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(host, 16))
        else:
            io.bind_cpu_input(name, host)

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                parallel: int | None = None) -> tuple[DecodeState, np.ndarray]:
        """Start a request: run the prompts (any lengths) and return the state and the logits of
        each prompt's last token, float32 [B, vocab]. Every row gets the tokens it would get alone
        (fused: right padding with per-row lengths; reference: left padding with cumsum positions).
        Raises RuntimeInputError for an empty prompt or one that leaves no room in the context."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RuntimeInputError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        ctx = self.manifest.max_position_embeddings
        if longest + 1 > ctx:
            raise RuntimeInputError(f"the prompt has {longest} tokens; the model's context is {ctx} tokens")
        B = len(prompts)
        st = self.new_state(B, request_capacity(longest, max_new_tokens, ctx), parallel)
        if self.fused:
            ids = np.zeros((B, longest), dtype=np.int64)
            for b, p in enumerate(prompts):
                ids[b, :len(p)] = p
            logits = self.step(st, ids, np.array([len(p) for p in prompts], dtype=np.int64))
            return st, logits[:, 0]
        pad = self.manifest.pad_token_id
        eos = self.manifest.eos_token_ids
        ids, st.mask, pos = left_pad(prompts, pad if pad is not None else (eos[0] if eos else 0))
        logits, present = self.forward(ids, st.mask, pos, st.cache.tensors)
        st.cache.advance(present)
        st.positions = pos[:, -1:]
        return st, logits[:, -1]

    def decode(self, state: DecodeState, tokens: np.ndarray, active: np.ndarray | None = None) -> np.ndarray:
        """Append one token per row; return the next logits float32 [B, vocab].

        ``tokens`` int64 [B]; ``active`` bool [B] (rows already finished pass False: fused graphs leave
        their cache untouched). Raises RuntimeInputError when the state is full or of another batch."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        if self.fused:
            q = np.ones(state.batch, dtype=np.int64) if active is None else active.astype(np.int64)
            return self.step(state, tokens, q)[:, 0]
        if state.closed:
            raise RuntimeInputError("this decode state was closed; start a new one with prefill()")
        state.positions = state.positions + 1
        state.mask = np.concatenate([state.mask, np.ones((state.batch, 1), dtype=np.int64)], axis=1)
        logits, present = self.forward(tokens, state.mask, state.positions, state.cache.tensors)
        state.cache.advance(present)
        return logits[:, -1]

    def score(self, input_ids: np.ndarray, parallel: int | None = None) -> np.ndarray:
        """Logits of every position without a prior cache: int64 [B, S] -> float32 [B, S, vocab]
        (perplexity, comparisons)."""
        B, S = input_ids.shape
        if not self.fused:
            return self.forward(input_ids, np.ones_like(input_ids),
                                np.arange(S, dtype=np.int64)[None].repeat(B, 0))[0]
        st = self.new_state(B, S, parallel)
        try:
            return self.step(st, input_ids, None, np.arange(S, dtype=np.int64)[None].repeat(B, 0))
        finally:
            st.close()

    # --------------------------------------------------------------------------------- generation
    def generate_tokens(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | None = None,
                        eos_token_ids: Sequence[int] | None = None, parallel: int | None = None
                        ) -> Iterator[np.ndarray]:
        """Yield the next token of every row, one int64 [B] array per step.

        Each row gets the tokens it would get alone. A row stops at any eos id (the eos token is
        yielded, later steps repeat -1 for it); the loop ends when every row stopped or after
        ``max_new_tokens``. ``parallel`` picks P for this request (fused graphs). The KV cache is
        freed when the generator finishes or is closed. Raises RuntimeInputError for an empty
        prompt or one longer than the model's context.
        """
        sampling = sampling or SamplingConfig()
        eos = np.array(sorted(set(self.manifest.eos_token_ids if eos_token_ids is None else eos_token_ids)),
                       dtype=np.int64)
        pad = self.manifest.pad_token_id
        pad = pad if pad is not None else (int(eos[0]) if eos.size else 0)
        state, logits = self.prefill(prompts, sampling.max_new_tokens, parallel)
        try:
            rng = np.random.default_rng(sampling.seed)
            done = np.zeros(state.batch, dtype=bool)
            longest = max(len(p) for p in prompts)
            budget = min(sampling.max_new_tokens, self.manifest.max_position_embeddings - longest)
            for step in range(budget):
                nxt = np.where(done, -1, sample_next(logits, sampling, rng))
                yield nxt
                done |= np.isin(nxt, eos)
                if done.all() or step == budget - 1:
                    return
                logits = self.decode(state, np.where(done, pad, nxt), ~done)
        finally:
            state.close()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | None = None,
                 eos_token_ids: Sequence[int] | None = None, parallel: int | None = None) -> list[list[int]]:
        """New tokens per prompt (the eos token included when one was produced)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_tokens(prompts, sampling, eos_token_ids, parallel):
            for b, t in enumerate(step):
                if t >= 0:
                    out[b].append(int(t))
        return out

    # ------------------------------------------------------------------------------------- text
    @property
    def tokenizer(self):
        """The folder's :class:`parscale_edge.tokenizer.Tokenizer` (loaded on first use)."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer
            self._tokenizer = Tokenizer.from_dir(self.folder)
        return self._tokenizer

    def stream_text(self, prompt: str, sampling: SamplingConfig | None = None, chat: bool = False,
                    history: list[dict] | None = None, parallel: int | None = None) -> Iterator[str]:
        """Yield text pieces of one answer as tokens arrive (never a split multi-byte character).

        ``chat=True`` wraps ``history`` + the prompt in the model's chat template. The eos token is
        not printed."""
        from .tokenizer import StreamDecoder

        tok = self.tokenizer
        if chat:
            messages = list(history or []) + [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = prompt
        ids = tok.encode(text)
        eos = set(self.manifest.eos_token_ids)
        dec = StreamDecoder(tok)
        for step in self.generate_tokens([ids], sampling, parallel=parallel):
            t = int(step[0])
            if t < 0 or t in eos:
                break
            piece = dec.put(t)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail
