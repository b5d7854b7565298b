"""Reuse a GGUF's own quantized blocks as MatMulNBits weights instead of re-rounding them.

A GGUF weight is already quantized; dequantizing it to fp32 and quantizing again with
round-to-nearest puts every value on a *new* grid and costs quality (+29 to +37% perplexity on
smollm2-135m's Q4_1 weights). Where the GGUF block layout matches a MatMulNBits layout, the
integer codes and scales can be copied over: this is a change of storage format, not new
quantization math. Blocks run along the input dimension K in both formats.

| GGUF type | block | value | MatMulNBits | exact? |
| --- | --- | --- | --- | --- |
| Q4_0 | 32 | d * (q - 8), q in 0..15 | 4-bit, block 32, default zero point 8 | yes |
| Q4_1 | 32 | d * q + m | 4-bit, block 32, scale d, default zero point 8, plus a correction (below) | yes |
| Q5_0 | 32 | d * (q - 16), q in 0..31 | 8-bit, block 32, code q + 112, default zero point 128 | yes |
| Q8_0 | 32 | d * q, q in -127..127 | 8-bit, block 32, code q + 128, default zero point 128 | yes |
| Q4_K | 32 (in 256) | d*sc * q - dmin*m, q in 0..15 | 4-bit, block 32, like Q4_1 (default zero point 8, correction) | yes |
| Q6_K | 16 (in 256) | d*sc * (q - 32), q in 0..63 | 8-bit, block 16, code q + 96, default zero point 128 | yes |

Q4_1 needs the correction because its offset m is a float while MatMulNBits zero points are
integers: ``W[n, k] = d (q - 8) + r[n, b]`` with the per-block residual ``r = m + 8 d``. So
``x @ W^T = MatMulNBits(x) + blocksum(x) @ r^T``, where ``blocksum`` sums x over each block of 32
(one MatMul with a 0/1 block-indicator matrix [K, K/32], shared by all weights reading the same
input) and ``r^T`` is a small fp32 matrix [K/32, N] (1/32 of the fp32 weight, a quarter of the
4-bit codes). Rounding the offset instead (no correction) cost +22% perplexity on smollm2-135m;
MatMulNBits' float zero points are exact but ran 12x slower than fp32 here.

Other types (K-quants, F16, ...) are left to the regular quantizer.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

#: GGUF ggml type name -> (bytes per GGUF block, MatMulNBits bits, MatMulNBits block size)
REPACKABLE = {"Q4_0": (18, 4, 32), "Q4_1": (20, 4, 32), "Q5_0": (22, 8, 32), "Q8_0": (34, 8, 32),
              "Q4_K": (144, 4, 32), "Q6_K": (210, 8, 16)}

_NODE_RE = re.compile(r"^/model/layers\.(\d+)/(self_attn|mlp)/(\w+_proj)/MatMul$")


@dataclass
class RepackedWeight:
    """MatMulNBits tensors for one weight W [N, K] (HF layout; the MatMul computes x @ W^T).

    packed: uint8 [N, K/bs, bs*bits/8] for block size bs; scales: float32 [N, K/bs];
    zero_points: uint8 [N, ceil(K/bs / 2)] (4-bit, two per byte) or None (default zero point).
    residual: float32 [N, K/bs] per-block offset that MatMulNBits cannot hold (Q4_1, Q4_K), or None.
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    gguf_type: str
    residual: np.ndarray | None = None
    block_size: int = 32


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
    nbytes, bits, bs = REPACKABLE[gguf_type]
    N = raw.shape[0]
    if gguf_type in ("Q4_K", "Q6_K"):
        return _repack_k(raw, gguf_type)
    blocks = raw.reshape(N, -1, nbytes)  # [N, nb, bytes]
    d = _fp16(blocks, 0)
    zp = None
    residual = None
    if gguf_type in ("Q4_0", "Q4_1"):
        qs = blocks[..., 4 if gguf_type == "Q4_1" else 2:]
        # ggml: element j in the low nibble of qs[j], element j+16 in the high nibble of qs[j]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, nb, 32] in element order
        if gguf_type == "Q4_1":
            # the whole offset goes to the (exact, float32) correction and the 4-bit blocks keep
            # MatMulNBits' default zero point 8: no zero-point input, the symmetric kernel (2.6% less
            # time per smollm2 int4 decode step than integer zero points round(-m/d) with the rest
            # of the offset in the correction; same values)
            m = _fp16(blocks, 2)
            residual = (m + 8.0 * d).astype(np.float32)  # [N, nb]
        packed = _pack_nibbles(codes)
    elif gguf_type == "Q8_0":
        packed = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:  # Q5_0: d (2 bytes), qh (4 bytes: 5th bit of each element), qs (16 bytes: low nibbles)
        qh = blocks[..., 2:6].copy().view(np.uint32)[..., 0]  # [N, nb]
        qs = blocks[..., 6:]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)  # [N, nb, 32]
        high = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16) << 4
        packed = (low + high - 16 + 128).astype(np.uint8)
    return RepackedWeight(packed, d, zp, bits, gguf_type, residual, bs)


def _repack_k(raw: np.ndarray, gguf_type: str) -> RepackedWeight:
    """K-quants: read the sub-block scales from the super-block header, recover the integer codes
    from ggml's own dequantization (``x / scale`` is an exact integer up to float rounding)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import Q4_K, dequantize

    N = raw.shape[0]
    nbytes = REPACKABLE[gguf_type][0]
    sb = raw.reshape(N, -1, nbytes)  # super-blocks of 256
    x = dequantize(raw, GGMLQuantizationType[gguf_type]).reshape(N, -1).astype(np.float32)
    if gguf_type == "Q4_K":
        d = _fp16(sb, 0)[..., None]
        dmin = _fp16(sb, 2)[..., None]
        sc, m = Q4_K.get_scale_min(sb[..., 4:16].reshape(-1, 12))
        scale = (d * sc.reshape(N, -1, 8).astype(np.float32)).reshape(N, -1)  # [N, K/32]
        mn = (dmin * m.reshape(N, -1, 8).astype(np.float32)).reshape(N, -1)
        xb = x.reshape(N, -1, 32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scale[..., None] != 0, np.rint((xb + mn[..., None]) / scale[..., None]), 0)
        q = np.clip(q, 0, 15).astype(np.uint8)
        residual = (8.0 * scale - mn).astype(np.float32)  # default zero point 8, offset corrected (as Q4_1)
        return RepackedWeight(_pack_nibbles(q), scale.astype(np.float32), None, 4, gguf_type, residual, 32)
    # Q6_K: ql[128] qh[64] scales int8[16] d fp16 -> 16 sub-blocks of 16
    d = _fp16(sb, 208)[..., None]
    sc = sb[..., 192:208].copy().view(np.int8).astype(np.float32)
    scale = (d * sc).reshape(N, -1)  # [N, K/16]
    xb = x.reshape(N, -1, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[..., None] != 0, np.rint(xb / scale[..., None]), 0)
    codes = (np.clip(q, -32, 31) + 128).astype(np.uint8)
    return RepackedWeight(codes, scale.astype(np.float32), None, 8, gguf_type, None, 16)


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


#: Packed MatMuls of the fused graph (parscale_edge.export.onnx_builder.PACKED) and the weights they hold, in order.
PACKED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def hf_name_of_node(node_name: str) -> str | None:
    """``/model/layers.3/mlp/down_proj/MatMul`` -> ``model.layers.3.mlp.down_proj.weight``."""
    m = _NODE_RE.match(node_name)
    return f"model.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}.weight" if m else None


def hf_names_of_node(node_name: str) -> tuple[str, ...]:
    """HF weight names a MatMul holds, in output order: one, or several for a packed node
    (``/model/layers.3/self_attn/qkv_proj/MatMul`` -> q, k, v); () for other nodes."""
    m = _NODE_RE.match(node_name)
    if not m:
        return ()
    parts = PACKED_PARTS.get(m.group(3), (m.group(3),))
    return tuple(f"model.layers.{m.group(1)}.{m.group(2)}.{p}.weight" for p in parts)


def concat_repacked(parts: list[RepackedWeight]) -> RepackedWeight | None:
    """The weights of a packed MatMul stacked along N (rows): exact, since MatMulNBits blocks run
    along K. None when the parts differ in GGUF type (a packed node then keeps separate weights)."""
    first = parts[0]
    if any(p.gguf_type != first.gguf_type for p in parts):
        return None
    zp = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])
    res = None if first.residual is None else np.concatenate([p.residual for p in parts])
    return RepackedWeight(np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
                          zp, first.bits, first.gguf_type, res, first.block_size)


def read_gguf_blocks(path: str | os.PathLike, names: set[str]) -> dict[str, RepackedWeight]:
    """Repack the GGUF tensors (by HF name) whose type allows it; others are absent from the result.

    llama files: q/k rows are un-permuted exactly as :func:`parscale_edge.gguf_io.read_gguf_tensors` does
    (whole rows move, blocks along K are untouched)."""
    from parscale_edge.gguf_io import unpermute_rope, gguf_to_hf_name, open_gguf, read_gguf_config

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
            raw = unpermute_rope(raw, cfg.num_attention_heads)
        elif permuted and t.name.endswith("attn_k.weight"):
            raw = unpermute_rope(raw, cfg.num_key_value_heads)
        out[name] = repack(np.ascontiguousarray(raw), t.tensor_type.name)
    del reader
    return out
