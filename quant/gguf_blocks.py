"""Reuse a GGUF's own quantized blocks as MatMulNBits weights instead of re-rounding them.

A GGUF weight is already quantized; dequantizing it to fp32 and quantizing again with
round-to-nearest puts every value on a *new* grid and costs quality (+29 to +37% perplexity on
smollm2-135m's Q4_1 weights). Where the GGUF block layout matches a MatMulNBits layout, the
integer codes and scales can be copied over: this is a change of storage format, not new
quantization math. Blocks run along the input dimension K in both formats.

| GGUF type | block | value | MatMulNBits | exact? |
| --- | --- | --- | --- | --- |
| Q4_0 | 32 | d * (q - 8), q in 0..15 | 4-bit, block 32, default zero point 8 | yes |
| Q4_1 | 32 | d * q + m | 4-bit, block 32, scale d, zero point z = round(-m / d), plus a correction (below) | yes |
| Q5_0 | 32 | d * (q - 16), q in 0..31 | 8-bit, block 32, code q + 112, default zero point 128 | yes |
| Q8_0 | 32 | d * q, q in -127..127 | 8-bit, block 32, code q + 128, default zero point 128 | yes |

Q4_1 needs the correction because its offset m is a float while MatMulNBits zero points are
integers: ``W[n, k] = d (q - z) + r[n, b]`` with the per-block residual ``r = m + d z``. So
``x @ W^T = MatMulNBits(x) + blocksum(x) @ r^T``, where ``blocksum`` sums x over each block of 32
(a Reshape + ReduceSum shared by all weights reading the same input) and ``r^T`` is a small fp32
matrix [K/32, N] (1/8 of the fp32 weight). Rounding the offset instead (no correction) cost +22%
perplexity on smollm2-135m; MatMulNBits' float zero points are exact but ran 12x slower than fp32
here.

Other types (K-quants, F16, ...) are left to the regular quantizer.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

#: GGUF ggml type name -> (bytes per block of 32, MatMulNBits bits)
REPACKABLE = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q5_0": (22, 8), "Q8_0": (34, 8)}
BLOCK = 32

_NODE_RE = re.compile(r"^/model/layers\.(\d+)/(self_attn|mlp)/(\w+_proj)/MatMul$")


@dataclass
class RepackedWeight:
    """MatMulNBits tensors for one weight W [N, K] (HF layout; the MatMul computes x @ W^T).

    packed: uint8 [N, K/32, 32*bits/8]; scales: float32 [N, K/32];
    zero_points: uint8 [N, ceil(K/32 / 2)] (4-bit, two per byte) or None (default zero point).
    residual: float32 [N, K/32] per-block offset that MatMulNBits cannot hold (Q4_1), or None.
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    gguf_type: str
    residual: np.ndarray | None = None


def _fp16(raw: np.ndarray, start: int) -> np.ndarray:
    return raw[..., start:start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """codes uint8 [..., 32] in 0..15 -> [..., 16]: element 2i in the low nibble, 2i+1 in the high."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def repack(raw: np.ndarray, gguf_type: str) -> RepackedWeight:
    """Turn GGUF blocks ``raw`` (uint8 [N, K/32 * block_bytes], one row per output feature) into
    MatMulNBits tensors. Raises ValueError for a type not in :data:`REPACKABLE`."""
    if gguf_type not in REPACKABLE:
        raise ValueError(f"GGUF type {gguf_type} cannot be repacked; supported: {', '.join(REPACKABLE)}")
    nbytes, bits = REPACKABLE[gguf_type]
    N = raw.shape[0]
    blocks = raw.reshape(N, -1, nbytes)  # [N, nb, bytes]
    d = _fp16(blocks, 0)
    zp = None
    residual = None
    if gguf_type in ("Q4_0", "Q4_1"):
        qs = blocks[..., 4 if gguf_type == "Q4_1" else 2:]
        # ggml: element j in the low nibble of qs[j], element j+16 in the high nibble of qs[j]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, nb, 32] in element order
        if gguf_type == "Q4_1":
            m = _fp16(blocks, 2)
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(d != 0, np.rint(-m / d), 0.0)
            z = np.clip(z, 0, 15).astype(np.uint8)  # [N, nb]
            residual = (m + d * z).astype(np.float32)
            nb = z.shape[1]
            if nb % 2:
                z = np.concatenate([z, np.zeros((N, 1), np.uint8)], axis=1)
            zp = _pack_nibbles(z.reshape(N, -1, 2).reshape(N, -1))  # two blocks per byte
            zp = zp.reshape(N, (nb + 1) // 2)
        packed = _pack_nibbles(codes)
    elif gguf_type == "Q8_0":
        packed = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:  # Q5_0: d (2 bytes), qh (4 bytes: 5th bit of each element), qs (16 bytes: low nibbles)
        qh = blocks[..., 2:6].copy().view(np.uint32)[..., 0]  # [N, nb]
        qs = blocks[..., 6:]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)  # [N, nb, 32]
        high = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
        packed = (low + high - 16 + 128).astype(np.uint8)
    return RepackedWeight(packed, d, zp, bits, gguf_type, residual)


def dequantize_repacked(w: RepackedWeight, with_residual: bool = True) -> np.ndarray:
    """Float32 [N, K] that MatMulNBits (plus the residual correction) computes with ``w``."""
    N = w.packed.shape[0]
    if w.bits == 4:
        codes = np.stack([w.packed & 0x0F, w.packed >> 4], axis=-1).reshape(N, w.packed.shape[1], -1).astype(np.float32)
        if w.zero_points is None:
            z = np.full(w.scales.shape, 8.0, np.float32)
        else:
            z = np.stack([w.zero_points & 0x0F, w.zero_points >> 4], -1).reshape(N, -1)[:, : w.scales.shape[1]].astype(np.float32)
    else:
        codes = w.packed.astype(np.float32)
        z = np.full(w.scales.shape, 128.0, np.float32)
    out = (codes - z[..., None]) * w.scales[..., None]
    if with_residual and w.residual is not None:
        out = out + w.residual[..., None]
    return out.reshape(N, -1)


def hf_name_of_node(node_name: str) -> str | None:
    """``/model/layers.3/mlp/down_proj/MatMul`` -> ``model.layers.3.mlp.down_proj.weight``."""
    m = _NODE_RE.match(node_name)
    return f"model.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}.weight" if m else None


def read_gguf_blocks(path: str | os.PathLike, names: set[str]) -> dict[str, RepackedWeight]:
    """Repack the GGUF tensors (by HF name) whose type allows it; others are absent from the result.

    llama files: q/k rows are un-permuted exactly as :func:`edge.gguf_io.read_gguf_tensors` does
    (whole rows move, blocks along K are untouched)."""
    from edge.gguf_io import _unpermute_rope, gguf_to_hf_name, open_gguf, read_gguf_config

    cfg = read_gguf_config(path)
    reader = open_gguf(path)
    permuted = cfg.family == "llama"
    out = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is None or name not in names or t.tensor_type.name not in REPACKABLE:
            continue
        raw = np.asarray(t.data)
        raw = raw.reshape(raw.shape[0], -1)
        if permuted and t.name.endswith("attn_q.weight"):
            raw = _unpermute_rope(raw, cfg.num_attention_heads)
        elif permuted and t.name.endswith("attn_k.weight"):
            raw = _unpermute_rope(raw, cfg.num_key_value_heads)
        out[name] = repack(np.ascontiguousarray(raw), t.tensor_type.name)
    del reader
    return out
