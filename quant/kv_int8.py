"""An int8 KV cache for a fused export (issue 18, item 2): static scales, calibrated on a text.

ONNX Runtime's GroupQueryAttention (com.microsoft) keeps its cache in int8 when the node carries
``k_quant_type`` / ``v_quant_type`` (PER_TENSOR or PER_CHANNEL), ``kv_cache_bit_width`` 8 and the
scales as inputs 12 (``k_scale``) and 13 (``v_scale``), float32: [1] per tensor, [kv_heads, 1,
head_dim] per channel (the kernel reads channel ``h*head_dim + d``; checked against float32 on
onnxruntime 1.31.1 and 1.32). It writes ``round(x / scale)`` (saturating) and reads ``q * scale``;
the query and the attention output stay in the graph's float type.

This module (a tool: it may import the runtime):

* :func:`calibrate` runs the float export on a calibration text (default the held-out stdlib code,
  :func:`parscale_edge.evaluate.stdlib_text`) as one first prompt per P the folder offers, and reads
  the float cache afterwards: post-RoPE keys and values, *including* the ParScale prefix slots, per
  layer and channel (the maximum over every P: one backbone serves them all);
* :func:`rewrite_graph` turns the graph's ``past_key_values.*`` / ``present.*`` into int8 and gives
  every GroupQueryAttention node the attributes and its scale initializers ``kv_scale.{i}.key`` /
  ``.value`` (scale = :data:`SCALE_MARGIN` * amax / 127); nothing else changes;
* :func:`quantize_kv_folder` writes a new export folder with that graph (weights untouched, the data
  file copied), the manifest's ``cache_dtype`` "int8" and ``kv_cache`` record
  (:data:`parscale_edge.manifest.KV_INT8`). ``quantize_folder(..., kv_cache="int8")`` does the same
  on top of weight quantization.

Measured on smollm2-135m (docs/measurements.md, "int8 KV cache"): 4x less KV memory than float32
(2x less than float16) and 0-13% off a decode step at 2048 tokens of context, but a first prompt
about 2.4x slower and top-1 agreement under 99%: an option, not the default.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from parscale_edge.atomic import atomic_folder, check_replaceable
from parscale_edge.manifest import (DATA_FILE, KV_INT8, MANIFEST_FILE, MODEL_FILE, Manifest, past_names,
                                    present_names)

from .onnx_quant import QuantizationError, eval_tokens, quality_line

#: ``--kv-cache`` values: ``float`` (the graph's own float type, the default) or ``int8``.
KV_CACHE_CHOICES = ("float", "int8")
#: GroupQueryAttention quantization of both K and V: per channel (one scale per kv head and
#: head_dim channel). Chosen by measurement on smollm2-135m (bench/results/kv_cache_int8/): rotated
#: keys have a few channels far larger than the rest, so one scale per tensor spends most of the
#: 8 bits on them.
QUANT = "PER_CHANNEL"
#: scale = SCALE_MARGIN * amax / 127: headroom for values beyond the calibration text's maximum
#: (they saturate); measured on smollm2-135m (bench/results/kv_cache_int8/).
SCALE_MARGIN = 1.0
#: tokens of the calibration text run per P (capped by the model's context)
CALIBRATION_TOKENS = 2048
#: the smallest amax a channel gets (an all-zero channel would give a zero scale)
MIN_AMAX = 1e-6


def check_kv_choice(value: str | None) -> str:
    """``value`` of ``--kv-cache`` (None: ``float``); raises QuantizationError (one line) for another."""
    v = "float" if value is None else value
    if v not in KV_CACHE_CHOICES:
        raise QuantizationError(f"unknown --kv-cache {value!r}; use float (the graph's own float type, the default) "
                                "or int8")
    return v


def check_source(src: Path, man: Manifest) -> None:
    """Raises QuantizationError (one line naming the fix) unless ``src`` is a fused graph with a float16
    or float32 cache."""
    if man.graph != "fused":
        raise QuantizationError(f"{src} is a {man.graph} graph; --kv-cache int8 rewrites the fused graph's "
                                "GroupQueryAttention: export it with --graph fused (the default)")
    if man.cache_dtype == KV_INT8:
        raise QuantizationError(f"{src} already keeps its KV cache in int8; quantize the float export it was made from")
    if man.cache_dtype not in ("float32", "float16"):
        raise QuantizationError(f"{src} keeps its KV cache in {man.cache_dtype}; --kv-cache int8 takes an fp32 or "
                                "fp16 export")


def calibration_tokens(folder: Path, man: Manifest, text: str | None, n: int) -> tuple[list[int], str]:
    """Token ids of the calibration ``text`` (default the held-out stdlib code) with the folder's
    tokenizer, at most ``n``; seeded random ids for a folder without a tokenizer (tiny test models).
    Returns (ids, a description of the text); raises QuantizationError for a text of fewer than 2 tokens."""
    if not (folder / "tokenizer.json").exists():
        desc = "random token ids (no tokenizer)"
    else:
        desc = "held-out stdlib code (parscale_edge.evaluate.stdlib_text)" if text is None else "--calibration text"
    return eval_tokens(folder, man, text, n, what="calibration"), desc


def calibrate(src: str | os.PathLike, text: str | None = None, tokens: int = CALIBRATION_TOKENS,
              threads: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-layer, per-channel absolute maxima of the float cache of the fused export ``src``.

    Runs the text's first ``tokens`` tokens (capped by the context) as one first prompt for every P
    the folder offers and reads the cache afterwards (every slot in use: ParScale prefix and tokens,
    keys after RoPE). Returns (amax_k, amax_v), float32 [num_layers, kv_heads, head_dim], and
    ``{"text", "tokens", "parallel"}``. Raises QuantizationError for a source :func:`check_source`
    refuses, ManifestError for a broken folder."""
    from parscale_edge.runtime import OnnxCausalLM

    src = Path(src)
    rt = OnnxCausalLM(src, device="cpu", threads=threads)
    m = rt.manifest
    check_source(src, m)
    ids, desc = calibration_tokens(src, m, text, min(tokens, m.max_position_embeddings - 1))
    shape = (m.num_layers, m.num_key_value_heads, m.head_dim)
    amax = [np.zeros(shape, np.float32), np.zeros(shape, np.float32)]
    for P in rt.parallel_choices:
        st = rt.new_state(1, len(ids), P)
        try:
            rt.step(st, np.array([ids], dtype=np.int64))
            used = int(st.cache.lengths.max())
            for j, t in enumerate(st.cache.tensors):  # [P, kv, slots, hd], key/value per layer
                a = np.abs(np.asarray(t[:, :, :used], dtype=np.float32)).max(axis=(0, 2))
                np.maximum(amax[j % 2][j // 2], a, out=amax[j % 2][j // 2])
        finally:
            st.close()
    return amax[0], amax[1], {"text": desc, "tokens": len(ids), "parallel": list(rt.parallel_choices)}


def scales(amax: np.ndarray, quant: str = QUANT, margin: float = SCALE_MARGIN) -> np.ndarray:
    """GroupQueryAttention scales from :func:`calibrate`'s amax [L, kv_heads, head_dim]: float32
    [L, kv_heads, 1, head_dim] (PER_CHANNEL) or [L, 1] (PER_TENSOR); margin * amax / 127."""
    if quant == "PER_CHANNEL":
        a = np.maximum(amax, MIN_AMAX)[:, :, None, :]
    elif quant == "PER_TENSOR":
        a = np.maximum(amax.reshape(amax.shape[0], -1).max(axis=1), MIN_AMAX)[:, None]
    else:
        raise QuantizationError(f"unknown KV quantization {quant!r} (PER_CHANNEL or PER_TENSOR)")
    return (margin * a / 127.0).astype(np.float32)


def rewrite_graph(model: onnx.ModelProto, k_scales: np.ndarray, v_scales: np.ndarray, quant: str = QUANT) -> int:
    """Make the fused graph's KV cache int8, in place: ``past_key_values.{i}.*`` inputs and
    ``present.{i}.*`` outputs become int8; every GroupQueryAttention node (layer i, found by its
    past input) gets ``k_quant_type``/``v_quant_type`` = ``quant``, ``kv_cache_bit_width`` 8 and inputs
    12/13 = initializers ``kv_scale.{i}.key`` / ``.value`` (``k_scales[i]``, ``v_scales[i]``, float32,
    from :func:`scales`); the metadata ``cache_dtype`` becomes int8. Returns the nodes rewritten.
    Raises QuantizationError when the graph's nodes and cache names disagree (not a fused graph)."""
    L = k_scales.shape[0]
    cache = set(past_names(L)) | set(present_names(L))
    io = [v for v in (*model.graph.input, *model.graph.output) if v.name in cache]
    if len(io) != 4 * L:
        raise QuantizationError(f"the graph has {len(io)} of the {4 * L} cache inputs/outputs of {L} layers; "
                                "re-export the fused graph")
    for v in io:
        v.type.tensor_type.elem_type = TensorProto.INT8
    done = 0
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        past = node.input[3]
        if not past.startswith("past_key_values.") or not past.endswith(".key"):
            raise QuantizationError(f"{node.name}: its past key is {past!r}, not a graph cache input; re-export")
        i = int(past.split(".")[1])
        names = []
        for kind, s in (("key", k_scales[i]), ("value", v_scales[i])):
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(s, np.float32),
                                                                   f"kv_scale.{i}.{kind}"))
            names.append(f"kv_scale.{i}.{kind}")
        ins = list(node.input) + [""] * (12 - len(node.input))
        del node.input[:]
        node.input.extend(ins[:12] + names)
        for a in list(node.attribute):
            if a.name in ("k_quant_type", "v_quant_type", "kv_cache_bit_width"):
                node.attribute.remove(a)
        node.attribute.extend([helper.make_attribute("k_quant_type", quant),
                               helper.make_attribute("v_quant_type", quant),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        done += 1
    if done != L:
        raise QuantizationError(f"found {done} GroupQueryAttention nodes for {L} layers; re-export the fused graph")
    meta = {p.key: p for p in model.metadata_props}
    if "cache_dtype" in meta:
        meta["cache_dtype"].value = KV_INT8
    else:
        model.metadata_props.add(key="cache_dtype", value=KV_INT8)
    return done


def kv_record(compute_dtype: str, info: dict, quant: str = QUANT, margin: float = SCALE_MARGIN) -> dict:
    """The manifest's ``kv_cache`` field (:data:`parscale_edge.manifest.KV_INT8`)."""
    return {"dtype": KV_INT8, "quant": quant, "compute_dtype": compute_dtype, "scale_margin": margin,
            "calibration": info}


def int8_scales(src: Path, calibration_text: str | None, threads: int | None, quant: str = QUANT,
                margin: float = SCALE_MARGIN, tokens: int = CALIBRATION_TOKENS) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`calibrate` then :func:`scales` for K and V: (k_scales, v_scales, calibration info)."""
    ak, av, info = calibrate(src, calibration_text, tokens, threads)
    return scales(ak, quant, margin), scales(av, quant, margin), info


def quantize_kv_folder(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                       calibration_text: str | None = None, compare_positions: int = 1024, text: str | None = None,
                       threads: int | None = None, quant: str = QUANT, margin: float = SCALE_MARGIN,
                       calibration: int = CALIBRATION_TOKENS) -> Path:
    """Copy the fused float export ``src`` to ``out`` with an int8 KV cache (weights untouched).

    Scales come from :func:`calibrate` on ``calibration_text`` (default: held-out stdlib code) and
    ``calibration`` tokens; the graph is rewritten by :func:`rewrite_graph` (the weights' data file is
    copied byte for byte); the manifest gets ``cache_dtype`` "int8" and ``kv_cache`` (:func:`kv_record`,
    plus ``quality_vs_float``: :func:`parscale_edge.evaluate.compare` against ``src`` over
    ``compare_positions`` positions of ``text``, 0 to skip). Written atomically. Raises
    QuantizationError (a reference graph, a bf16 or already int8 cache), ManifestError (not an export
    folder), FileExistsError (``out`` exists without ``overwrite``)."""
    src, out = Path(src), Path(out)
    man = Manifest.read(src)
    check_source(src, man)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another folder")
    if overwrite:
        check_replaceable(out, [src])
    ks, vs, info = int8_scales(src, calibration_text, threads, quant, margin, calibration)
    model = onnx.load(str(src / MODEL_FILE), load_external_data=False)  # weights stay in the data file
    rewrite_graph(model, ks, vs, quant)
    with atomic_folder(out, overwrite, sources=[src]) as tmp:
        onnx.save(model, str(tmp / MODEL_FILE))
        for f in src.iterdir():
            if f.name != MODEL_FILE and f.is_file():
                shutil.copy2(f, tmp / f.name)  # model.onnx.data (unchanged), tokenizer, sidecars
            elif f.is_dir():
                shutil.copytree(f, tmp / f.name)
        if not (tmp / DATA_FILE).exists():
            raise QuantizationError(f"{src} has no {DATA_FILE}; re-export it")
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        compute = man.cache_dtype
        man.cache_dtype = KV_INT8
        man.kv_cache = kv_record(compute, info, quant, margin)
        (tmp / MANIFEST_FILE).write_text(man.to_json())
        if compare_positions:
            from parscale_edge.evaluate import compare, onnx_logits_fn
            from parscale_edge.runtime import OnnxCausalLM

            tokens = eval_tokens(src, man, text, compare_positions + 1)
            ref = OnnxCausalLM(src, device="cpu", threads=threads)
            cand = OnnxCausalLM(tmp, device="cpu", threads=threads)
            man.kv_cache["quality_vs_float"] = compare(onnx_logits_fn(ref), onnx_logits_fn(cand), tokens,
                                                       max_positions=compare_positions)
            (tmp / MANIFEST_FILE).write_text(man.to_json())
    return out


def report_lines(man: Manifest, out: str | os.PathLike, seconds: float) -> list[str]:
    """What ``parscale quantize --kv-cache int8`` prints about the folder ``out`` it wrote (manifest
    ``man``) in ``seconds``: the scales' source, the KV memory ratio and, when measured, the quality
    cost against the float cache (perplexity, KL mean, top-1 agreement)."""
    k, r = man.kv_cache, man.kv_cache.get("quality_vs_float")
    lines = [f"int8 KV cache ({k['quant']}, scales from {k['calibration']['tokens']} tokens) -> {out} in "
             f"{seconds:.1f} s; KV memory 1/{4 if k['compute_dtype'] == 'float32' else 2} of {k['compute_dtype']}"]
    if r:
        lines.append(quality_line(f"{k['compute_dtype']} cache", r, kl_p99=False))
    return lines
