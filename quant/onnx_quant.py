"""Weight-only quantization of an exported folder with ONNX Runtime's own tooling.

4-bit and 8-bit go through ``onnxruntime.quantization.matmul_nbits_quantizer`` (MatMulNBits, block
scales, optional zero points); per-tensor dynamic int8 through ``quantize_dynamic``. We write no
quantization math: this module chooses nodes, checks settings, runs the quantizer and writes the
folder. Our own graph passes are small and named:

* :func:`untie_lm_head`: a tied ``lm_head`` is exported as ``Gemm(x, embedding, transB=1)`` sharing
  the embedding (see :mod:`export`); ORT's quantizer only quantizes MatMul, so to quantize the head
  we give it its own transposed weight and a MatMul (the Gather keeps the embedding).
* :func:`set_accuracy_level`: the ``accuracy_level`` attribute of chosen MatMulNBits nodes.
"""
from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from parscale_edge.atomic import atomic_folder, check_replaceable, folder_size_mib
from parscale_edge.manifest import (DATA_FILE, KV_INT8, MANIFEST_FILE, MODEL_FILE, PACKED_WIDTHS_KEY, TOKEN_ROWS_KEY,
                                    Manifest)

PRECISIONS = ("int4", "int8", "int8-dynamic")
ALGORITHMS = ("rtn", "hqq", "gptq")
AGGREGATOR_SCOPE = "aggregate_layer"  # node-name scope of the ParScale aggregator: never quantized
LM_HEAD_NODE = "lm_head"
GGUF_CORRECTION = "_gguf_correction"


class QuantizationError(ValueError):
    """Settings or input that cannot be quantized; nothing was written."""


#: onnxruntime 1.31's quantize_dynamic writes a reference graph that fails its own shape inference
#: (tested: .ci/ort_compat.sh); 1.32's does not.
INT8_DYNAMIC_MIN_ORT = (1, 32)


@dataclass
class QuantConfig:
    """What to quantize and how.

    precision: ``int4`` (MatMulNBits 4-bit), ``int8`` (MatMulNBits 8-bit, block-wise, weight-only;
        also runs on the CUDA EP), ``int8-dynamic`` (per-tensor dynamic int8: fragile for LMs).
    block_size: 16..256, a power of two, dividing every quantized MatMul's input dimension.
    symmetric: symmetric blocks (no zero point) or asymmetric (uint zero point per block, like GGUF Q4_1).
    accuracy_level: MatMulNBits compute type: 0 = unset (fp32 activations), 1 fp32, 2 fp16, 3 bf16,
        4 int8 activations (quantized per block at run time: fastest on CPU, slightly less exact).
    algorithm: ``rtn`` (round to nearest, ORT's DefaultWeightOnlyQuantConfig), ``hqq`` (half-quadratic,
        ORT's HQQ quantizer: needs torch), ``gptq`` (ORT's GPTQ: needs calibration text).
    quantize_lm_head / quantize_embedding: quantize the output head (default yes) / the input
        embedding (GatherBlockQuantized, int4 only; default no).
    """

    precision: str = "int4"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    algorithm: str = "rtn"
    quantize_lm_head: bool = True
    quantize_embedding: bool = False
    gguf_blocks: bool = True

    # gguf_blocks: when the export came from a GGUF, copy its quantized blocks into MatMulNBits
    # instead of re-rounding (see parscale_edge.quant.gguf_blocks and _keep_gguf_blocks): int4 copies the 4-bit
    # types and keeps the GGUF's sensitive 8-bit-class tensors (Q6_K, Q8_0, an 8-bit head) at 8
    # bits; int8 copies the 8-bit container types. Copied nodes keep the GGUF's block size.

    def validate(self) -> None:
        """Raises QuantizationError naming the bad setting and the allowed values."""
        if self.precision not in PRECISIONS:
            raise QuantizationError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.algorithm not in ALGORITHMS:
            raise QuantizationError(f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
        b = self.block_size
        if not (16 <= b <= 256 and b & (b - 1) == 0):
            raise QuantizationError(f"block size {b} is not supported: use a power of two from 16 to 256")
        if not 0 <= self.accuracy_level <= 4:
            raise QuantizationError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        if self.precision != "int4" and self.algorithm != "rtn":
            raise QuantizationError(f"algorithm {self.algorithm} is 4-bit only; int8 uses rtn")
        if self.quantize_embedding and self.precision != "int4":
            raise QuantizationError("--quantize-embedding is int4 only (GatherBlockQuantized)")


# ------------------------------------------------------------------------------------ graph passes
def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def untie_lm_head(model: onnx.ModelProto) -> bool:
    """Replace the tied head ``Gemm(x, E, zero_bias, transB=1)`` by ``MatMul(x, E^T)`` with its own
    initializer ``lm_head.weight_t`` [H, vocab], so MatMul quantizers can reach it. The embedding
    initializer stays for the Gather. Returns False when there is no such Gemm (untied models
    already have a MatMul head). Raises QuantizationError if the Gemm has a non-zero bias."""
    inits = _initializers(model)
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) != 0:
            continue
        if len(node.input) > 2 and node.input[2]:
            b = node.input[2]
            bias = numpy_helper.to_array(inits[b]) if b in inits else \
                numpy_helper.to_array(helper.get_attribute_value(consts[b].attribute[0])) if b in consts else None
            if bias is None or np.any(bias != 0):
                raise QuantizationError("the output head has a non-zero bias; cannot untie it")
        w = numpy_helper.to_array(inits[node.input[1]])
        wt = numpy_helper.from_array(np.ascontiguousarray(w.T), "lm_head.weight_t")
        model.graph.initializer.append(wt)
        mm = helper.make_node("MatMul", [node.input[0], wt.name], list(node.output), name=f"/{LM_HEAD_NODE}/MatMul")
        model.graph.node.remove(node)
        model.graph.node.insert(i, mm)
        return True
    return False


def unpack_matmul(model: onnx.ModelProto, name: str, weights: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Split the packed MatMul ``name`` (weight [K, sum N_i]) into one MatMul per part plus a Concat,
    named like the unpacked graph (``.../q_proj/MatMul``); returns {new node name: (weight,)}.
    The part widths come from the graph's ``packed_widths`` metadata. Raises QuantizationError
    when it is missing or disagrees with the weight."""
    inits = _initializers(model)
    idx, node = next((i, n) for i, n in enumerate(model.graph.node) if n.name == name)
    w = numpy_helper.to_array(inits[node.input[1]])
    widths = _packed_widths(model, name, w.shape[1], len(weights))
    scope = name.rsplit("/", 2)[0]
    outs, new, mapping, start = [], [], {}, 0
    for hf, width in zip(weights, widths):
        part = hf.split(".")[-2]  # q_proj
        t = numpy_helper.from_array(np.ascontiguousarray(w[:, start:start + width]), f"{hf}_t")
        model.graph.initializer.append(t)
        out = f"{scope}/{part}/MatMul_output_0"
        new.append(helper.make_node("MatMul", [node.input[0], t.name], [out], name=f"{scope}/{part}/MatMul"))
        outs.append(out)
        mapping[f"{scope}/{part}/MatMul"] = (hf,)
        start += width
    new.append(helper.make_node("Concat", outs, list(node.output), name=f"{name}/unpacked", axis=-1))
    model.graph.node.remove(node)
    for k, n in enumerate(new):
        model.graph.node.insert(idx + k, n)
    return mapping


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The model's metadata_props as a dict (keys written by the exporters)."""
    return {p.key: p.value for p in model.metadata_props}


def _packed_widths(model: onnx.ModelProto, name: str, total: int, parts: int) -> list[int]:
    """Output widths of a packed node's parts, from the graph's metadata ``packed_widths`` (written by
    parscale_edge.export.onnx_builder as JSON {node name: [widths]})."""
    import json

    widths = json.loads(_metadata(model).get(PACKED_WIDTHS_KEY, "{}")).get(name)
    if not widths or sum(widths) != total or len(widths) != parts:
        raise QuantizationError(f"{name}: cannot split the packed weight (no packed_widths metadata); re-export")
    return widths


def head_node_name(model: onnx.ModelProto, vocab_size: int) -> str | None:
    """Name of the MatMul computing the logits: the one whose constant weight is [hidden, vocab]."""
    inits = _initializers(model)
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            dims = list(inits[n.input[1]].dims)
            if len(dims) == 2 and dims[1] == vocab_size:
                return n.name
    return None


def _keep_float(name: str, cfg: QuantConfig, head: str | None) -> bool:
    """Nodes never quantized: the ParScale aggregator, GGUF residual corrections, an excluded head."""
    return AGGREGATOR_SCOPE in name or GGUF_CORRECTION in name or (not cfg.quantize_lm_head and name == head)


def quantizable_matmuls(model: onnx.ModelProto, cfg: QuantConfig, head: str | None) -> list[onnx.NodeProto]:
    """MatMul nodes with a 2-D constant weight that ``cfg`` quantizes (aggregator always excluded)."""
    inits = _initializers(model)
    out = []
    for n in model.graph.node:
        if n.op_type != "MatMul" or n.input[1] not in inits or len(inits[n.input[1]].dims) != 2:
            continue
        if _keep_float(n.name, cfg, head):
            continue
        out.append(n)
    return out


def apply_gguf_blocks(model: onnx.ModelProto, blocks: dict, node_to_weight: dict[str, str],
                      accuracy_level: int) -> list[str]:
    """Replace MatMul nodes by MatMulNBits nodes holding repacked GGUF blocks; returns their names.

    ``node_to_weight`` maps node names to HF weight names present in ``blocks``
    (:func:`parscale_edge.quant.gguf_blocks.read_gguf_blocks`). A weight with a residual (Q4_1) gets the exact
    correction ``+ blocksum(x) @ residual^T``; the block sums are computed once per input tensor (one
    MatMul with a 0/1 block-indicator matrix), the correction is one Gemm with the MatMulNBits output
    as C on graphs of 2-D token rows (metadata ``token_rows_2d``), else a MatMul and an Add."""
    inits = _initializers(model)
    nodes = list(model.graph.node)
    new_nodes: list[onnx.NodeProto] = []
    blocksums: dict[str, str] = {}
    indicators: set[str] = set()
    done = []
    rows_2d = _metadata(model).get(TOKEN_ROWS_KEY) == "1"
    for node in nodes:
        w = node_to_weight.get(node.name)
        if node.op_type != "MatMul" or w not in blocks:
            new_nodes.append(node)
            continue
        rw = blocks[w]
        K, N = inits[node.input[1]].dims
        if rw.packed.shape[0] != N or rw.packed.shape[1] * rw.block_size != K:
            new_nodes.append(node)  # layout differs: leave it to the quantizer
            continue
        base = node.input[1]
        tensors = [numpy_helper.from_array(rw.packed, f"{base}_gguf_{rw.gguf_type}"),
                   numpy_helper.from_array(rw.scales, f"{base}_gguf_scales")]
        if rw.zero_points is not None:
            tensors.append(numpy_helper.from_array(rw.zero_points, f"{base}_gguf_zero_points"))
        model.graph.initializer.extend(tensors)
        attrs = dict(K=K, N=N, bits=rw.bits, block_size=rw.block_size)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        x, y = node.input[0], node.output[0]
        q_out = y if rw.residual is None else y + "_gguf_q"
        new_nodes.append(helper.make_node("MatMulNBits", [x] + [t.name for t in tensors], [q_out],
                                          name=node.name + "_Q" + str(rw.bits), domain="com.microsoft", **attrs))
        if rw.residual is not None:
            bs = rw.block_size
            key = f"{x}_gguf_blocksum{bs}"
            if key not in blocksums:
                # block sums as one MatMul with a 0/1 block-indicator matrix [K, K/bs] (shared by every
                # input of width K): one node instead of Reshape + ReduceSum, 0.35 ms less per
                # smollm2-135m int4 decode step (121 corrections)
                ind = f"gguf_block_indicator_{K}x{bs}"
                if ind not in indicators:
                    eye = np.zeros((K, K // bs), np.float32)
                    eye[np.arange(K), np.arange(K) // bs] = 1.0
                    model.graph.initializer.append(numpy_helper.from_array(eye, ind))
                    indicators.add(ind)
                blocksums[key] = key
                new_nodes.append(helper.make_node("MatMul", [x, ind], [key], name=f"{x}/gguf_blocksum{bs}{GGUF_CORRECTION}"))
            rt = numpy_helper.from_array(np.ascontiguousarray(rw.residual.T), f"{base}_gguf_residual")  # [nb, N]
            model.graph.initializer.append(rt)
            if rows_2d:  # one node: Gemm(blocksum, residual^T, C = MatMulNBits output)
                new_nodes.append(helper.make_node("Gemm", [key, rt.name, q_out], [y],
                                                  name=node.name + GGUF_CORRECTION, beta=1.0))
            else:
                new_nodes.append(helper.make_node("MatMul", [key, rt.name], [y + "_gguf_corr"],
                                                  name=node.name + GGUF_CORRECTION))
                new_nodes.append(helper.make_node("Add", [q_out, y + "_gguf_corr"], [y],
                                                  name=node.name + "_gguf_add"))
        done.append(node.name)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {n for node in model.graph.node for n in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


#: GGUF types that llama.cpp's mixes (Q4_K_M and friends) use for the tensors they single out as
#: sensitive (output head, some v_proj/down_proj). int4 keeps them at 8 bits instead of re-rounding.
SENSITIVE_GGUF_TYPES = ("Q6_K", "Q8_0")


def _keep_gguf_blocks(cfg: QuantConfig, rw, is_head: bool) -> bool:
    """Which GGUF tensors to copy. int4: the 4-bit ones (Q4_0, Q4_1, Q4_K) and the 8-bit-class ones
    the GGUF's mix made sensitive (Q6_K, Q8_0; also any 8-bit output head); Q5_0, llama.cpp's
    fallback for shapes that K-quants cannot take, is re-rounded to 4 bits. int8: every type
    stored in an 8-bit container (Q5_0, Q6_K, Q8_0)."""
    if cfg.precision == "int8":
        return rw.bits == 8
    return rw.bits == 4 or rw.gguf_type in SENSITIVE_GGUF_TYPES or (is_head and rw.bits == 8)


def source_gguf(man: Manifest) -> Path | None:
    """The GGUF file an export was made from, when it can be found and its sha256 matches."""
    from parscale_edge.hub import MODELS, fetch_gguf, sha256_file

    if man.source in MODELS:
        return fetch_gguf(man.source, progress=False)
    p = Path(man.source)
    if p.suffix == ".gguf" and p.is_file() and sha256_file(p) == man.source_sha256:
        return p
    return None


def set_accuracy_level(model: onnx.ModelProto, level: int, only: set[str] | None = None) -> int:
    """Set ``accuracy_level`` on MatMulNBits nodes (all, or those named in ``only``); returns how many."""
    k = 0
    for n in model.graph.node:
        if n.op_type != "MatMulNBits" or (only is not None and n.name not in only):
            continue
        for a in list(n.attribute):
            if a.name == "accuracy_level":
                n.attribute.remove(a)
        n.attribute.append(helper.make_attribute("accuracy_level", level))
        k += 1
    return k


# -------------------------------------------------------------------------------------- quantizer
def _run_quantizer(model: onnx.ModelProto, cfg: QuantConfig, exclude: list[str], calibration=None) -> onnx.ModelProto:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    from onnxruntime.quantization.quant_utils import QuantFormat

    ops = ("MatMul", "Gather") if cfg.quantize_embedding else ("MatMul",)
    level = cfg.accuracy_level
    if cfg.algorithm == "rtn":
        algo = mnq.DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                                accuracy_level=level, quant_format=QuantFormat.QOperator,
                                                op_types_to_quantize=ops, bits=8 if cfg.precision == "int8" else 4)
    elif cfg.algorithm == "hqq":
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=4, op_types_to_quantize=ops)
    else:
        if calibration is None:
            raise QuantizationError("GPTQ needs calibration text: pass --calibration FILE")
        algo = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration, block_size=cfg.block_size,
                                             op_types_to_quantize=ops)
    q = mnq.MatMulNBitsQuantizer(model, bits=8 if cfg.precision == "int8" else 4, block_size=cfg.block_size,
                                 is_symmetric=cfg.symmetric, accuracy_level=level, nodes_to_exclude=exclude,
                                 op_types_to_quantize=ops, algo_config=algo)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    try:
        q.process()
    except Exception as e:  # noqa: BLE001 - ORT's quantizers raise assorted internal errors
        raise QuantizationError(f"onnxruntime's {cfg.algorithm.upper()} quantizer failed on this model "
                                f"({type(e).__name__}: {str(e)[:200]}); try --algorithm rtn") from e
    out = q.model.model
    if not any(o.domain == "com.microsoft" for o in out.opset_import):  # the GPTQ path omits it
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if cfg.algorithm != "rtn":  # HQQ/GPTQ do not all take accuracy_level: set it on every node
        set_accuracy_level(out, level)
    return out


def quantize_folder(src: str | os.PathLike, out: str | os.PathLike, cfg: QuantConfig, overwrite: bool = False,
                    calibration_text: str | None = None, check_positions: int = 2048,
                    compare_positions: int = 1024, text: str | None = None, threads: int | None = None,
                    kv_cache: str = "float") -> Path:
    """Quantize the fp32 (or fp16) export in ``src`` into a new export folder ``out``.

    ``kv_cache`` ``int8`` (fused graphs) also makes the KV cache int8 with static scales calibrated on
    the float ``src`` and ``calibration_text`` (default held-out stdlib code;
    :mod:`parscale_edge.quant.kv_int8`); the quality check and comparison then include its cost.

    An fp16 source gives MatMulNBits with float16 activations and scales (the GPU int4/int8 path;
    its KV cache stays float16, ``cache_dtype`` is copied); GGUF blocks are reused for fp32
    sources only, and int8-dynamic needs fp32.

    With ``accuracy_level`` 4, :func:`choose_accuracy_levels` then measures top-1 agreement against
    the same weights at level 0 over ``check_positions`` positions and falls back to level 0 on
    sensitive nodes when it is below :data:`MIN_LEVEL4_AGREEMENT`. Finally the quantized model is
    compared with ``src`` over ``compare_positions`` positions of ``text`` (default: held-out
    standard-library code; random tokens when the folder has no tokenizer). 0 skips either step.
    Writes into a temporary sibling folder and renames it at the end; the manifest records every
    setting and measurement under ``quantization``. Raises:
        QuantizationError: bad settings, an already quantized source, a block size that does not
            divide a weight's input dimension.
        ManifestError: ``src`` is not an export folder. FileExistsError: ``out`` exists.
        parscale_edge.atomic.OutputPathError: ``overwrite`` may not replace ``out`` (it is or holds ``src``, or
            holds files this toolkit did not write).
    """
    cfg.validate()
    src, out = Path(src), Path(out)
    man = Manifest.read(src)
    if man.quantization or man.precision not in ("fp32", "fp16", "bf16"):
        raise QuantizationError(f"{src} is already quantized (precision {man.precision}); quantize the fp32 export "
                                "it was made from (or an fp16 one, for int4/int8 with fp16 activations on a GPU)")
    if man.cache_dtype == KV_INT8:
        raise QuantizationError(f"{src} already keeps its KV cache in int8; quantize the float export it was made "
                                "from with --precision ... --kv-cache int8")
    if man.precision == "bf16":
        raise QuantizationError(f"{src} is a bf16 export, which the quantizer does not read (bfloat16 weights); "
                                "quantize the fp32 export of the model (or an fp16 one, for a GPU)")
    if man.precision == "fp16" and cfg.precision == "int8-dynamic":
        raise QuantizationError("int8-dynamic needs an fp32 export; use --precision int4 or int8 on an fp16 export")
    if out.exists() and not overwrite:  # fail before the slow load
        raise FileExistsError(f"{out} exists; pass --overwrite or choose another folder")
    if overwrite:
        check_replaceable(out, [src])  # never the source, nor a folder of other files
    kv_scales = None
    if kv_cache != "float":
        from .kv_int8 import check_kv_choice, check_source, int8_scales

        check_kv_choice(kv_cache)
        check_source(src, man)
        kv_scales = int8_scales(src, calibration_text, threads)  # on the float export, before any rounding
    model = onnx.load(str(src / MODEL_FILE), load_external_data=True)
    untied = cfg.quantize_lm_head and cfg.precision != "int8-dynamic" and untie_lm_head(model)
    head = head_node_name(model, man.vocab_size)
    repacked: list[str] = []
    # GGUF block reuse writes float32 scales and corrections: fp32 sources only
    if cfg.gguf_blocks and cfg.precision != "int8-dynamic" and man.precision == "fp32":
        gguf_path = source_gguf(man)
        if gguf_path is not None:
            from .gguf_blocks import concat_repacked, hf_names_of_node, read_gguf_blocks

            node_names = {n.name: hf_names_of_node(n.name) for n in model.graph.node if n.op_type == "MatMul"}
            if head and cfg.quantize_lm_head:
                node_names[head] = ("model.embed_tokens.weight" if man.tie_word_embeddings else "lm_head.weight",)
            raw = read_gguf_blocks(gguf_path, {w for ws in node_names.values() for w in ws})
            kept = {k: v for k, v in raw.items() if _keep_gguf_blocks(cfg, v, (k,) == node_names.get(head))}
            # a packed node whose parts the GGUF stores differently is split back into one MatMul each
            mixed = [n for n, ws in node_names.items() if len(ws) > 1 and any(w in kept for w in ws)
                     and (not all(w in kept for w in ws) or concat_repacked([kept[w] for w in ws]) is None)]
            for name in mixed:
                node_names.update(unpack_matmul(model, name, node_names.pop(name)))
            blocks, node_to_weight = {}, {}
            for name, ws in node_names.items():
                if ws and all(w in kept for w in ws):
                    key = "+".join(ws)
                    blocks[key] = kept[ws[0]] if len(ws) == 1 else concat_repacked([kept[w] for w in ws])
                    node_to_weight[name] = key
            repacked = apply_gguf_blocks(model, blocks, node_to_weight, cfg.accuracy_level)
    targets = quantizable_matmuls(model, cfg, head)
    inits = _initializers(model)
    bad = [(n.name, inits[n.input[1]].dims[0]) for n in targets if inits[n.input[1]].dims[0] % cfg.block_size]
    if bad and cfg.precision != "int8-dynamic":
        raise QuantizationError(f"block size {cfg.block_size} does not divide the input dimension of "
                                f"{len(bad)} weights (e.g. {bad[0][0]}: {bad[0][1]}); choose a block size that divides it")
    exclude = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and _keep_float(n.name, cfg, head)]
    if cfg.precision == "int8-dynamic":
        import onnxruntime as ort

        from parscale_edge.runtime import ort_version

        if ort_version(ort.__version__) < INT8_DYNAMIC_MIN_ORT:
            raise QuantizationError(
                f"--precision int8-dynamic needs onnxruntime >= {'.'.join(map(str, INT8_DYNAMIC_MIN_ORT))}: the "
                f"quantize_dynamic of onnxruntime {ort.__version__} writes a graph that it cannot load (Add: "
                "incompatible dimensions); use --precision int8 (block-wise, also on CUDA) or upgrade onnxruntime")
    with atomic_folder(out, overwrite, sources=[src]) as tmp:
        if cfg.precision == "int8-dynamic":
            warnings.warn("per-tensor dynamic int8 is fragile for language models (measured here: +70% "
                          "perplexity on smollm2-135m); prefer --precision int8 (block-wise)", stacklevel=2)
            from onnxruntime.quantization import QuantType, quantize_dynamic

            staged = tmp / "fp32"
            staged.mkdir()
            onnx.save_model(model, str(staged / MODEL_FILE), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=DATA_FILE)
            quantize_dynamic(str(staged / MODEL_FILE), str(staged / "q.onnx"), weight_type=QuantType.QInt8,
                             per_channel=False, op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                             use_external_data_format=True)
            qmodel = onnx.load(str(staged / "q.onnx"), load_external_data=True)
            shutil.rmtree(staged)
        else:
            calib = None
            if cfg.algorithm == "gptq":
                calib = _calibration_reader(src, man, calibration_text)
            qmodel = _run_quantizer(model, cfg, exclude, calib)
        del model
        if kv_scales is not None:
            from .kv_int8 import kv_record, rewrite_graph

            rewrite_graph(qmodel, kv_scales[0], kv_scales[1])
            man.kv_cache = kv_record(man.cache_dtype, kv_scales[2])
            man.cache_dtype = KV_INT8
        onnx.save_model(qmodel, str(tmp / MODEL_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        for f in src.iterdir():
            if f.name not in (MODEL_FILE, DATA_FILE) and f.is_file():
                shutil.copy2(f, tmp / f.name)
            elif f.is_dir():  # fused graphs: ParScale parts (prefixes, aggregator) stay float32
                shutil.copytree(f, tmp / f.name)
        source_precision = man.precision
        man.precision = cfg.precision
        man.quantization = {**asdict(cfg), "lm_head_untied": bool(untied), "source_precision": source_precision,
                            "gguf_repacked_nodes": len(repacked),
                            "quantized_nodes": sum(n.op_type in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeLinear",
                                                                 "GatherBlockQuantized") for n in qmodel.graph.node),
                            "tool": "onnxruntime.quantization"}
        (tmp / MANIFEST_FILE).write_text(man.to_json())
        del qmodel
        tokens = eval_tokens(src, man, text, max(check_positions, compare_positions) + 1)
        if check_positions and cfg.precision != "int8-dynamic" and cfg.accuracy_level == 4:
            man.quantization["accuracy_check"] = choose_accuracy_levels(tmp, tokens, check_positions, threads)
        if compare_positions:
            from parscale_edge.evaluate import compare, onnx_logits_fn
            from parscale_edge.runtime import OnnxCausalLM

            ref = OnnxCausalLM(src, device="cpu", threads=threads)
            cand = OnnxCausalLM(tmp, device="cpu", threads=threads)
            man.quantization["quality_vs_fp32"] = compare(onnx_logits_fn(ref), onnx_logits_fn(cand), tokens,
                                                          max_positions=compare_positions)
        man.quantization["size_mib"] = round(folder_size_mib(tmp), 2)
        man.quantization["source_size_mib"] = round(folder_size_mib(src), 2)
        (tmp / MANIFEST_FILE).write_text(man.to_json())
    return out


#: accuracy_level 4 is kept where it agrees with level 0 on at least this share of top-1 tokens ...
MIN_LEVEL4_AGREEMENT = 0.95
#: ... and raises perplexity over level 0 by at most this fraction (issue #5's int4 budget vs fp32).
MAX_LEVEL4_PPL_INCREASE = 0.005


def eval_tokens(folder: Path, man: Manifest, text: str | None, n: int, what: str = "evaluation") -> list[int]:
    """At most ``n`` token ids to measure (or calibrate) on: ``text`` (default held-out stdlib code)
    with the folder's tokenizer, or seeded random ids when the folder has no tokenizer (tiny test
    models). Raises QuantizationError when the ``what`` text has fewer than 2 tokens."""
    if (folder / "tokenizer.json").exists():
        from parscale_edge.evaluate import stdlib_text
        from parscale_edge.tokenizer import Tokenizer

        ids = Tokenizer.from_dir(folder).encode(text if text is not None else stdlib_text())
        if len(ids) < 2:
            raise QuantizationError(f"the {what} text has fewer than 2 tokens")
        return ids[:n]
    return np.random.default_rng(0).integers(0, man.vocab_size, n).tolist()


def choose_accuracy_levels(folder: Path, tokens: list[int], positions: int, threads: int | None = None) -> dict:
    """Pick per-node accuracy levels for the quantized graph in ``folder`` (edited in place).

    accuracy_level 4 quantizes activations to int8 per block at run time: fast on CPU, slightly
    inexact (docs/parscale.md, "MatMulNBits accuracy level 4"). Candidates, cheapest first: every MatMulNBits at level 4; 4-bit down_proj
    at 0; MLP 4-bit nodes at 0; every 4-bit node at 0; every node at 0. 8-bit nodes keep level 4 until the last step,
    since 8-bit MatMulNBits at level 0 ran 7-25x slower here. The first candidate whose top-1
    agreement with the all-level-0 graph reaches :data:`MIN_LEVEL4_AGREEMENT` and whose perplexity
    is within :data:`MAX_LEVEL4_PPL_INCREASE` of the level-0 graph's is kept. (Top-1 agreement alone
    was too strict: smollm2-135m's all-level-4 int4 agreed 96.8% with level 0 at -0.03% perplexity,
    and falling back cost 2x decode speed.)

    Returns ``{"agreement_level4_vs_level0", "ppl_increase_level4_vs_level0", "chosen", "agreement",
    "ppl_increase", "positions", "threshold", "max_ppl_increase"}``.
    """
    from parscale_edge.evaluate import compare, onnx_logits_fn
    from parscale_edge.runtime import OnnxCausalLM

    path = folder / MODEL_FILE
    graph = onnx.load(str(path), load_external_data=False)
    nbits = {n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
             for n in graph.graph.node if n.op_type == "MatMulNBits"}
    four = {k for k, b in nbits.items() if b == 4}
    candidates = [("all level 4", set()), ("down_proj 4-bit nodes level 0", {k for k in four if "down_proj" in k}),
                  ("MLP 4-bit nodes level 0", {k for k in four if "/mlp/" in k}),
                  ("all 4-bit nodes level 0", four), ("all level 0", set(nbits))]
    ref_graph = onnx.load(str(path), load_external_data=False)
    set_accuracy_level(ref_graph, 0)
    onnx.save(ref_graph, str(folder / "check_level0.onnx"))
    try:
        ref = OnnxCausalLM(folder, device="cpu", threads=threads, model_file="check_level0.onnx")
        ref_fn = onnx_logits_fn(ref)
        cache: dict = {}

        def cached_ref(ids):  # the level-0 reference is scored once per window
            key = ids.tobytes()
            if key not in cache:
                cache[key] = ref_fn(ids)
            return cache[key]

        result = {"positions": positions, "threshold": MIN_LEVEL4_AGREEMENT,
                  "max_ppl_increase": MAX_LEVEL4_PPL_INCREASE}
        tried: list[set] = []
        for label, zero in candidates:
            if zero in tried:  # e.g. an int8 graph has no 4-bit nodes: nothing new to try
                continue
            tried.append(zero)
            g = onnx.load(str(path), load_external_data=False)
            set_accuracy_level(g, 4)
            if zero:
                set_accuracy_level(g, 0, zero)
            if label == "all level 0":
                agree, rise = 1.0, 0.0
            else:
                onnx.save(g, str(folder / "check_candidate.onnx"))
                cand = OnnxCausalLM(folder, device="cpu", threads=threads, model_file="check_candidate.onnx")
                c = compare(cached_ref, onnx_logits_fn(cand), tokens, max_positions=positions)
                agree, rise = c["top1_agreement"], c["cand_perplexity"] / c["ref_perplexity"] - 1.0
                del cand
            result.setdefault("agreement_level4_vs_level0", agree)
            result.setdefault("ppl_increase_level4_vs_level0", rise)
            if agree >= MIN_LEVEL4_AGREEMENT and rise <= MAX_LEVEL4_PPL_INCREASE:
                onnx.save(g, str(path))  # same weights, new attributes; external data untouched
                onnx.checker.check_model(str(path))  # path-based: works above 2 GB
                result.update(chosen=label, agreement=agree, ppl_increase=rise)
                return result
        raise AssertionError("unreachable: 'all level 0' always qualifies")
    finally:
        for f in ("check_level0.onnx", "check_candidate.onnx"):
            (folder / f).unlink(missing_ok=True)


def _calibration_reader(src: Path, man: Manifest, text: str | None):
    """A CalibrationDataReader feeding prefill windows of ``text`` (GPTQ)."""
    if not text:
        raise QuantizationError("GPTQ needs calibration text: pass --calibration FILE")
    from onnxruntime.quantization import CalibrationDataReader

    from parscale_edge.manifest import past_names
    from parscale_edge.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(src).encode(text)[:2048]
    empty = np.zeros((man.parscale_n, man.num_key_value_heads, 0, man.head_dim), np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = []
            for b in range(0, max(1, len(ids) - 1), 256):
                chunk = np.array([ids[b:b + 256]], dtype=np.int64)
                feed = {"input_ids": chunk, "attention_mask": np.ones_like(chunk),
                        "position_ids": np.arange(chunk.shape[1], dtype=np.int64)[None]}
                feed.update({n: empty for n in past_names(man.num_layers)})
                self.items.append(feed)
            self.it = iter(self.items)

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.it = iter(self.items)

        def __deepcopy__(self, memo):
            r = Reader.__new__(Reader)
            r.items, r.it = self.items, iter(self.items)
            return r

    return Reader()


# ----------------------------------------------------------------------------------------- report
def report_lines(quantization: dict, cfg: QuantConfig, out: str | os.PathLike, base_precision: str,
                 seconds: float) -> list[str]:
    """What a quantization reports, from the manifest's ``quantization`` record of ``out`` (written
    by :func:`quantize_folder` with ``cfg``, in ``seconds``): the size against the ``base_precision``
    source (MiB), how many weights reuse a GGUF's blocks, the accuracy_level check, the quality cost
    against the source (perplexity, KL, top-1 agreement); the last two when they ran."""
    q = quantization
    n = q.get("gguf_repacked_nodes") or 0
    rest = q["quantized_nodes"] - n
    # the settings apply to the weights that are re-rounded; GGUF blocks are copied as they are
    how = f"{'sym' if cfg.symmetric else 'asym'}, block {cfg.block_size}, {cfg.algorithm}"
    lines = [f"{cfg.precision} ({how if rest > 0 else 'GGUF blocks'}) -> {out}: "
             f"{q['size_mib']:.1f} MiB ({base_precision} {q['source_size_mib']:.1f} MiB, "
             f"{q['size_mib'] / q['source_size_mib']:.0%}) in {seconds:.1f} s"]
    if n:
        lines.append(f"  {n} {'weight reuses' if n == 1 else 'weights reuse'} the GGUF's own quantized blocks "
                     "(no re-rounding); " + (f"{rest} re-rounded ({how})" if rest > 0 else "none re-rounded"))
    if "accuracy_check" in q:
        c = q["accuracy_check"]
        lines.append(f"  accuracy_level 4 vs 0: top-1 agreement {c['agreement_level4_vs_level0']:.2%}, perplexity "
                     f"{c['ppl_increase_level4_vs_level0']:+.2%} over {c['positions']} positions; chosen: "
                     f"{c['chosen']} ({c['agreement']:.2%}, {c['ppl_increase']:+.2%})")
    if "quality_vs_fp32" in q:
        lines.append(quality_line(base_precision, q["quality_vs_fp32"]))
    return lines


def quality_line(reference: str, r: dict, kl_p99: bool = True) -> str:
    """One report line of a quality cost, :func:`parscale_edge.evaluate.compare`'s result ``r``
    against ``reference``: perplexity before -> after (change), KL mean (and p99), top-1 agreement."""
    return (f"  quality cost vs {reference} ({r['positions']} positions): perplexity "
            f"{r['ref_perplexity']:.3f} -> {r['cand_perplexity']:.3f} "
            f"({r['cand_perplexity'] / r['ref_perplexity'] - 1:+.2%}), KL mean {r['kl_mean']:.4f}"
            + (f" p99 {r['kl_p99']:.4f}" if kl_p99 else "") + f", top-1 agreement {r['top1_agreement']:.2%}")


def level0_warning(quantization: dict) -> str | None:
    """The warning for a quantization whose accuracy_level check moved every node to level 0 (slow
    8-bit decode on CPUs), naming the two ways out; None otherwise."""
    c = quantization.get("accuracy_check")
    if not c or c["chosen"] != "all level 0":
        return None
    return ("every node now runs at accuracy_level 0; 8-bit MatMulNBits at level 0 decodes several "
            "times slower than fp32 on CPUs (README, Quantization). For speed, quantize again with "
            "--check-positions 0 (keeps level 4, top-1 agreement "
            f"{c['agreement_level4_vs_level0']:.1%}) or use --precision int4")
