"""The KV cache of one request: layout, allocation, ParScale prefix slots, per-row lengths and
placement (host numpy arrays or ONNX Runtime OrtValues), for both graph kinds (no torch here;
onnxruntime is imported only to make OrtValues).

:mod:`parscale_edge.manifest` is the contract this follows: 2*num_layers tensors in
``past_key_values.{i}.key`` / ``.value`` order, each [P*B, kv_heads, slots, head_dim] of the
manifest's ``cache_dtype`` (float32, float16, bfloat16, or int8 for a fused graph with an int8
cache); rows stream-major (``p*B + b``) for reference graphs and batch-major
(``b*P + p``) for fused graphs (:data:`parscale_edge.manifest.CACHE_ROW_ORDER`). numpy has no
bfloat16: a bfloat16 cache is held on the host as its uint16 bit patterns (:func:`bfloat16_bits`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .manifest import CACHE_ROW_ORDER, Manifest, ManifestError, cache_row

#: ``manifest.cache_dtype`` -> (ONNX element type number, numpy dtype holding its bits on the host).
CACHE_TYPES = {"float32": (1, np.float32), "float16": (10, np.float16), "bfloat16": (16, np.uint16),
               "int8": (3, np.int8)}
#: bytes per element of an OrtValue's ``data_type()`` (anything else: 4)
_ORT_ITEMSIZE = {"tensor(float16)": 2, "tensor(bfloat16)": 2, "tensor(int8)": 1, "tensor(uint8)": 1}


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 values -> bfloat16 bit patterns, uint16 of the same shape (round to nearest even,
    as torch's ``.to(torch.bfloat16)``; NaN stays a quiet NaN, overflow rounds to inf)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def cache_types(cache_dtype: str) -> tuple[int, type]:
    """(ONNX element type, numpy host dtype) of a ``manifest.cache_dtype`` (:data:`CACHE_TYPES`).
    Raises ManifestError for another name."""
    if cache_dtype not in CACHE_TYPES:
        raise ManifestError(f"unknown KV cache dtype {cache_dtype!r} in the manifest; use one of "
                            f"{', '.join(CACHE_TYPES)} (re-export the model)")
    return CACHE_TYPES[cache_dtype]


def cache_host_array(x: np.ndarray, cache_dtype: str) -> np.ndarray:
    """float32 ``x`` in the host representation of the float type ``cache_dtype`` (:data:`CACHE_TYPES`):
    float32, float16, or uint16 bfloat16 bits; same shape. Raises ManifestError for another cache dtype,
    and for int8 (an int8 cache's values are quantized by GroupQueryAttention, never by the host)."""
    if cache_dtype == "int8":
        raise ManifestError("int8 KV-cache values are written by GroupQueryAttention only; feed the compute dtype")
    host = cache_types(cache_dtype)[1]
    return bfloat16_bits(x) if host is np.uint16 else np.ascontiguousarray(x, dtype=host)


def tensor_shape(t) -> tuple[int, ...]:
    """Shape of a numpy array or an ONNX Runtime OrtValue (whose ``shape`` is a method)."""
    return t.shape if isinstance(t, np.ndarray) else tuple(t.shape())


def cache_nbytes(values: Sequence) -> int:
    """Bytes held by KV-cache tensors: numpy arrays, or ONNX Runtime OrtValues (host or device;
    float32 4 bytes per element, float16/bfloat16 2, int8 1)."""
    total = 0
    for v in values:
        if isinstance(v, np.ndarray):
            total += v.nbytes
        else:
            total += int(np.prod(v.shape())) * _ORT_ITEMSIZE.get(v.data_type(), 4)
    return total


class KVCache:
    """The KV cache of one request: 2*num_layers tensors and what their rows and slots hold.

    Attributes:
        graph: ``reference`` or ``fused`` (:attr:`parscale_edge.manifest.Manifest.graph`); it fixes
            the row order (:data:`parscale_edge.manifest.CACHE_ROW_ORDER`, :meth:`row`).
        P, batch: streams and user rows; the tensors have P*batch rows.
        tensors: 2*num_layers tensors [P*batch, kv_heads, slots, head_dim] of ``cache_dtype``, in
            ``past_key_values.{i}.key`` / ``.value`` order: numpy arrays on the host (uint16 bits
            for bfloat16) or OrtValues (on the host or in a device's memory).
        values: the OrtValues to bind to a session, same order: ``tensors`` itself when those are
            OrtValues; for a fused cache of numpy arrays, OrtValues wrapping them without a copy;
            empty for a reference cache of numpy arrays (fed to ``session.run`` as they are).
        n_prefix: slots at the front of every row holding its stream's ParScale prefix (fused
            graphs; reference graphs keep the prefix inside the graph, 0).
        capacity: slots per row, prefix included (fused: preallocated; reference: the tokens held).
        lengths: int64 [batch], slots in use per user row, prefix included.
        cache_dtype: ``float32``, ``float16``, ``bfloat16`` or ``int8`` (fused graphs: static scales
            inside the graph; the cache starts as zeros, prefix slots included, and the first prompt's
            prefix rows fill them).

    Fused graphs bind one preallocated cache (:meth:`allocate`) as both ``past`` and ``present``;
    GroupQueryAttention writes each step's keys and values in place, and the driver advances
    :attr:`lengths`. Reference graphs return a longer cache every step: :meth:`empty` starts one,
    :meth:`advance` takes each step's ``present`` tensors.
    """

    def __init__(self, graph: str, P: int, batch: int, tensors: list, values: list, cache_dtype: str,
                 n_prefix: int = 0, capacity: int = 0):
        self.graph, self.P, self.batch, self.cache_dtype = graph, P, batch, cache_dtype
        self.tensors, self.values = tensors, values
        self.n_prefix, self.capacity = n_prefix, capacity
        self.lengths = np.full(batch, n_prefix if graph == "fused" else capacity, dtype=np.int64)
        self.closed = False

    @classmethod
    def empty(cls, manifest: Manifest, batch: int, ort_values: bool = False) -> "KVCache":
        """Reference graphs: a cache of 0 tokens for ``batch`` user rows, 2*num_layers tensors
        [P*batch, kv_heads, 0, head_dim] of ``manifest.cache_dtype`` (P = ``manifest.parscale_n``).

        ``ort_values=False``: numpy arrays, for a plain ``session.run``. True: host OrtValues, for IO
        binding (empty, so nothing has to be copied to a device; the only way to feed a bfloat16
        cache). Raises ManifestError for a bfloat16 cache without ``ort_values`` (numpy cannot hold
        it) or an unknown cache dtype."""
        m = manifest
        if not ort_values and m.cache_dtype not in ("float32", "float16"):
            raise ManifestError(f"this export keeps its KV cache in {m.cache_dtype}, which numpy cannot hold; "
                                "run it with IO binding (OrtValues), e.g. on CUDA")
        onnx_type, host_dtype = cache_types(m.cache_dtype)
        z = np.zeros((m.parscale_n * batch, m.num_key_value_heads, 0, m.head_dim), dtype=host_dtype)
        if ort_values:
            import onnxruntime as ort

            z = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(z, onnx_type)
        tensors = [z] * (2 * m.num_layers)
        return cls("reference", m.parscale_n, batch, tensors, tensors if ort_values else [], m.cache_dtype)

    @classmethod
    def allocate(cls, shape: tuple[int, int, int, int], num_layers: int, cache_dtype: str, P: int = 1,
                 prefix: Sequence[tuple[np.ndarray, np.ndarray]] = (), device: str = "cpu",
                 device_memory: bool = False, n_prefix: int | None = None) -> "KVCache":
        """Fused graphs: the preallocated cache of one request, zeros with the ParScale prefix.

        Args:
            shape: (P*B, kv_heads, slots, head_dim), slots = n_prefix + the request's capacity;
                rows batch-major (b*P + p).
            cache_dtype: ``manifest.cache_dtype`` (float32, float16, bfloat16, int8).
            P: streams per user row.
            prefix: per layer (keys, values), each [P, kv_heads, n_prefix, head_dim] in the host
                representation of ``cache_dtype`` (:func:`cache_host_array`), written into the first
                n_prefix slots of every row of stream p; empty for no prefix (P = 1) or an int8 cache.
            n_prefix: prefix slots to reserve when ``prefix`` is empty (an int8 cache: left zero, the
                first prompt's prefix rows fill them); default the prefix's length, or 0.
            device: ONNX Runtime device name of the session (``cpu``, ``cuda``).
            device_memory: False: numpy arrays on the host, wrapped (no copy) by the OrtValues bound
                to the session (the CPU path). True: OrtValues allocated on ``device`` and filled from
                one host staging array of one tensor's size, reused for every tensor and dropped at
                the end (no host copy of the cache is kept; the CUDA path).
        Raises:
            ManifestError: an unknown ``cache_dtype``.
            ValueError: P*B rows that P does not divide, or a prefix of another P.
        """
        import onnxruntime as ort

        onnx_type, host_dtype = cache_types(cache_dtype)
        n = prefix[0][0].shape[2] if len(prefix) else 0
        if n and n_prefix is not None and n_prefix != n:
            raise ValueError(f"n_prefix {n_prefix} differs from the prefix's {n} slots")
        if shape[0] % P or (n and prefix[0][0].shape[0] != P):
            raise ValueError(f"a cache of {shape[0]} rows with a prefix for {prefix[0][0].shape[0] if n else P} "
                             f"streams does not fit P={P}")
        OV = ort.OrtValue

        def with_prefix(buf: np.ndarray, j: int) -> np.ndarray:
            if n:  # ParScale: prefix, written once per request
                buf.reshape(shape[0] // P, P, *shape[1:])[:, :, :, :n] = prefix[j // 2][j % 2][None]
            return buf

        if not device_memory:
            tensors = [with_prefix(np.zeros(shape, dtype=host_dtype), j) for j in range(2 * num_layers)]
            # both wrap the numpy memory, no copy (numpy has no bfloat16: its bits are uint16)
            values = [OV.ortvalue_from_numpy_with_onnx_type(b, onnx_type) if host_dtype is np.uint16
                      else OV.ortvalue_from_numpy(b) for b in tensors]
        else:
            host = np.zeros(shape, dtype=host_dtype)
            values = []
            for j in range(2 * num_layers):
                v = OV.ortvalue_from_shape_and_type(list(shape), onnx_type, device, 0)
                v.update_inplace(with_prefix(host, j))  # same size in bytes; uint16 bits for bfloat16
                values.append(v)
            del host
            tensors = values
        return cls("fused", P, shape[0] // P, tensors, values, cache_dtype, n or (n_prefix or 0), shape[2])

    @staticmethod
    def planned_nbytes(manifest: Manifest, P: int, batch: int, slots: int) -> int:
        """Bytes a cache of P*batch rows and ``slots`` slots per row takes for ``manifest``'s export
        (every layer, keys and values; 4 bytes per float32 element, 2 per float16/bfloat16, 1 per int8), before
        allocating it. Raises ManifestError for an unknown cache dtype."""
        item = np.dtype(cache_types(manifest.cache_dtype)[1]).itemsize
        return 2 * manifest.num_layers * P * batch * manifest.num_key_value_heads * slots * manifest.head_dim * item

    def row(self, p: int, b: int) -> int:
        """The tensor row of stream ``p`` of user row ``b`` (:func:`parscale_edge.manifest.cache_row`)."""
        return cache_row(self.graph, p, b, self.P, self.batch)

    @property
    def row_order(self) -> str:
        """``stream-major`` (reference graphs) or ``batch-major`` (fused graphs)."""
        return CACHE_ROW_ORDER[self.graph]

    @property
    def on_host(self) -> bool:
        """True when :attr:`tensors` are numpy arrays (their memory is the host's)."""
        return bool(self.tensors) and isinstance(self.tensors[0], np.ndarray)

    @property
    def nbytes(self) -> int:
        """Bytes the tensors hold (fused graphs: the preallocated capacity); 0 once closed."""
        return cache_nbytes(self.tensors)

    def advance(self, present: list) -> None:
        """Reference graphs: take a step's ``present`` tensors (2*num_layers, past + S slots, the
        same placement as the past) as the cache; every row now holds past + S slots."""
        self.tensors = present
        if self.values:
            self.values = present
        self.capacity = tensor_shape(present[0])[2]
        self.lengths[:] = self.capacity

    def close(self) -> None:
        """Drop the tensors now (idempotent); :attr:`nbytes` is 0 afterwards."""
        self.tensors, self.values, self.closed = [], [], True
