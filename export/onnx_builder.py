"""Build the fast ("fused") decoder graph directly from the weights, with ONNX Runtime's fused ops.

The TorchScript export (:mod:`parscale_edge.export.onnx_export`) is the reference: it mirrors our PyTorch code
node for node (unfused attention, ~2600 Constant nodes for smollm2-135m, past and present
concatenated every step). This builder writes the graph a runtime wants, in the way
onnxruntime-genai's model builder does: ``SkipSimplifiedLayerNormalization`` (plus two plain RMSNorms that ONNX Runtime fuses) for the RMSNorms and residual adds, ``GroupQueryAttention``
(RoPE inside from tables the runtime feeds, past and present sharing one preallocated buffer), plain ``MatMul`` weights that
``parscale quantize`` turns into ``MatMulNBits``, and logits only for the positions asked for.

ParScale (Chen et al. 2025, Sec. 2) in this graph:

* **replicate**: the embedded rows and the per-row lengths are expanded to P*B rows, batch-major
  (row ``b*P + p`` is stream p of sample b), so one sample's streams are contiguous;
* **prefix**: each stream's per-layer prefix keys/values occupy the first ``n_prefix`` slots of its
  KV-cache rows. The runtime writes them there when it allocates the cache, and a *first prompt*
  (a chunk into a cache holding only the prefix) also carries them as ``parscale.prefix_rows.{i}``
  in front of its packed q|k|v (zero queries, dropped after attention), because GroupQueryAttention
  reads no past on a first prompt. Every other step feeds zero prefix rows;
* **positions**: GroupQueryAttention rotates the token in cache slot s by row s of the RoPE tables,
  which are graph inputs (``rope.cos_cache``/``rope.sin_cache``, :func:`parscale_edge.manifest.rope_tables`):
  identity rows for the prefix slots (prefix keys carry no RoPE), then position p at slot
  n_prefix + p, so real tokens keep the dense model's positions for every P;
* **aggregate**: after the last layer only the requested positions are gathered, then the final
  RMSNorm, the aggregator MLP (its weights are graph *inputs*, ``parscale.aggregate.*``) and one
  ``lm_head`` over B*K rows.

Because the prefix, the RoPE tables and the aggregator are inputs, the graph does not depend on P:
one backbone export serves every P for which the folder has a ParScale part file (dynamic parallel
scaling). P = 1 feeds a zero aggregator (softmax over one stream is exactly 1) and no prefix.

Every GroupQueryAttention call is of a kind onnxruntime 1.31 (the newest onnxruntime-gpu as this is
written) accepts for any batch: a right-padded first prompt, or one token per row after a past.
A later multi-token chunk runs in one call only for a single cache row; the runtime steps it token
by token otherwise (:meth:`parscale_edge.runtime.OnnxCausalLM.step`). No ``position_ids`` input is used:
CUDA GroupQueryAttention refuses it in some releases and the CPU kernel ignores it on a first prompt.

Graph inputs and outputs, their shapes, dtypes and order are the contract in
:mod:`parscale_edge.manifest` (its ``fused`` section, :func:`parscale_edge.manifest.graph_inputs`);
this builder declares them from its names.

Half precision (fp16/bf16, the CUDA path): weights, matmuls, GroupQueryAttention and the KV cache in
half; the residual stream, norms, aggregator and logits in float32 (:func:`build_fused_graph`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from parscale_edge.adapter import backbone_sha256, is_parscale_tensor, save_adapter
from parscale_edge.atomic import atomic_folder
from parscale_edge.loading import LoadedModel
from parscale_edge.manifest import (AGG_INPUTS, CACHE_DTYPES, FUSED_STEP_INPUTS, PACKED_WIDTHS_KEY, ROPE_INPUTS,
                                    TOKEN_ROWS_KEY, past_names, prefix_row_names, present_names)

OPSET = 17
GRAPH_KIND = "fused"
PARSCALE_DIR = "parscale"
#: export precision -> ONNX element type of the weights, matmuls, GroupQueryAttention and KV cache
#: (the residual stream, norms, aggregator and logits are float32 in every precision)
ELEM_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


class _Graph:
    """Tiny helper collecting nodes and initializers with unique names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._named: set[str] = set()
        self._n = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def init_typed(self, name: str, array: np.ndarray, elem: int) -> str:
        """A float32 ``array`` stored as ONNX type ``elem`` (FLOAT, FLOAT16 or BFLOAT16; bfloat16
        rounded to nearest even, as torch rounds)."""
        if elem == TensorProto.FLOAT:
            return self.init(name, np.asarray(array, np.float32))
        if elem == TensorProto.FLOAT16:
            return self.init(name, np.asarray(array, np.float32).astype(np.float16))
        bits = torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(torch.bfloat16).view(torch.int16)
        t = helper.make_tensor(name, TensorProto.BFLOAT16, list(np.shape(array)), bits.numpy().tobytes(), raw=True)
        self.inits.append(t)
        return name

    def const_i64(self, values, name: str | None = None) -> str:
        """An int64 constant; a named one is stored once (later calls with that name share it)."""
        self._n += 1
        if name is not None and name in self._named:
            return name
        if name is not None:
            self._named.add(name)
        return self.init(name or f"const_i64_{self._n}", np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None, domain: str = "",
             outputs: list[str] | None = None, **attrs) -> list[str]:
        self._n += 1
        name = name or f"/{op}_{self._n}"
        outs = outputs or [f"{name}/output_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], **kw) -> str:
        return self.node(op, inputs, **kw)[0]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def fused_unsupported(cfg) -> str | None:
    """Why the fused graph cannot run ``cfg`` (a ParScaleConfig) on ONNX Runtime, or None."""
    if cfg.head_dim % 16:
        return f"head_dim {cfg.head_dim} is not a multiple of 16 (GroupQueryAttention needs one)"
    return None


#: Weights packed into one MatMul (fewer, wider kernels per step) and the packed node's name.
PACKED = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def build_fused_graph(lm: LoadedModel, precision: str = "fp32") -> onnx.ModelProto:
    """The fused decoder graph of ``lm`` (weights as initializers; see the module docstring).
    q/k/v are one MatMul feeding GroupQueryAttention's packed input, gate/up one MatMul and a Split
    (:data:`PACKED`).

    ``precision`` fp32, fp16 or bf16 (:data:`ELEM_TYPES`). fp16/bf16 (the CUDA path: ONNX Runtime's
    CUDA GroupQueryAttention is half precision only) store the embedding, every projection, the
    RoPE tables and ``lm_head`` in half precision, and run the matmuls, GroupQueryAttention, the MLP
    activation and the KV cache (``past_key_values.*``/``present.*``) in it. Kept in float32, as in
    :meth:`parscale_edge.model.ParScaleForCausalLM.to_mixed_precision`: the residual stream and its adds
    (the half outputs of attention and MLP are Cast to float32 before
    SkipSimplifiedLayerNormalization, whose normalized output is Cast back to half for the next
    MatMul), every RMSNorm and its weight, the final norm, the ParScale aggregator (its inputs stay
    float32) and the ``logits`` output. ``lm.model`` is not changed (it is cast to float32).

    Raises ValueError for a model whose config this graph cannot express (:func:`fused_unsupported`)
    or another precision."""
    if precision not in ELEM_TYPES:
        raise ValueError(f"unknown export precision {precision!r}; use {', '.join(ELEM_TYPES)} "
                         "(int4/int8: `parscale quantize` an fp32 or fp16 export)")
    model = lm.model.float().eval()
    cfg = model.config
    why = fused_unsupported(cfg)
    if why:
        raise ValueError(f"cannot build the fused graph: {why}; export with --graph reference")
    ht = ELEM_TYPES[precision]  # weights, matmuls, attention, KV cache
    sd = {k: v for k, v in model.state_dict().items()}
    L, H, nh, kv, hd, V = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                           cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
    g = _Graph()
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    step = [(i64, ["batch", "sequence"]), (i32, ["batch"]), (i32, []), (i64, ["batch", "gathered"])]
    inputs = [helper.make_tensor_value_info(n, t, shape) for n, (t, shape) in zip(FUSED_STEP_INPUTS, step)]
    # the aggregator's hidden width is H for P > 1; P = 1 feeds width 1 (its softmax is 1 anyway)
    agg = [["parallel_hidden", "aggregator_width"], ["aggregator_width"], ["aggregator_width", "parallel"], ["parallel"], []]
    inputs += [helper.make_tensor_value_info(n, f32, shape) for n, shape in zip(AGG_INPUTS, agg)]
    cache_shape = ["stream_batch", kv, "capacity", hd]
    inputs += [helper.make_tensor_value_info(n, ht, cache_shape) for n in past_names(L)]
    qkv_width = (nh + 2 * kv) * hd
    inputs += [helper.make_tensor_value_info(n, ht, ["stream_batch", "prefix_rows", qkv_width])
               for n in prefix_row_names(L)]
    inputs += [helper.make_tensor_value_info(n, ht, ["rope_slots", hd // 2]) for n in ROPE_INPUTS]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "gathered", V])]
    outputs += [helper.make_tensor_value_info(n, ht, cache_shape) for n in present_names(L)]

    def to_half(x: str, name: str) -> str:
        """float32 -> the weights' type (a no-op for fp32 graphs)."""
        return x if ht == f32 else g.one("Cast", [x], name=name, to=ht)

    def to_f32(x: str, name: str) -> str:
        """the weights' type -> float32 (a no-op for fp32 graphs)."""
        return x if ht == f32 else g.one("Cast", [x], name=name, to=f32)

    # ---- sizes: B from input_ids, P from the aggregator's last bias (graph does not bake P)
    shape_ids = g.one("Shape", ["input_ids"], name="/sizes/ids_shape")
    B = g.one("Gather", [shape_ids, g.const_i64([0])], name="/sizes/B", axis=0)  # [1]
    S = g.one("Gather", [shape_ids, g.const_i64([1])], name="/sizes/S", axis=0)  # [1]
    P = g.one("Shape", [AGG_INPUTS[3]], name="/sizes/P")  # [1]
    N = g.one("Mul", [B, P], name="/sizes/N")  # [1]
    one = g.const_i64([1], "one_i64")
    minus1 = g.const_i64([-1], "minus_one_i64")

    def replicate(x: str, tail: list[str], name: str, rows: str | None = None) -> str:
        """[B, *tail] -> [B*P, *tail], batch-major (ParScale: replicate); ``rows``: another shape to
        reshape the [B, P, *tail] copies to (default [B*P, *tail])."""
        u = g.one("Unsqueeze", [x, one], name=f"/replicate/{name}/Unsqueeze")
        e = g.one("Expand", [u, g.one("Concat", [B, P, *tail], name=f"/replicate/{name}/shape", axis=0)],
                  name=f"/replicate/{name}/Expand")
        rows = rows or g.one("Concat", [N, *tail], name=f"/replicate/{name}/rows", axis=0)
        return g.one("Reshape", [e, rows], name=f"/replicate/{name}/Reshape")

    # ---- embedding (one lookup for all streams) and replicate
    emb_w = g.init_typed("model.embed_tokens.weight", _np(sd["model.embed_tokens.weight"]), ht)
    x = g.one("Gather", [emb_w, "input_ids"], name="/model/embed_tokens/Gather", axis=0)  # [B, S, H]
    x = to_f32(x, "/model/embed_tokens/to_f32")  # the residual stream is float32
    Hc = g.const_i64([H], "hidden_i64")
    # the residual stream and every MatMul run on token rows [N*S, H] (2-D): ONNX Runtime then fuses
    # the quantizer's Q4_1 corrections (MatMul + Add) into one Gemm each; attention sees [N, S, .]
    x = replicate(x, [S, Hc], "hidden", rows=g.const_i64([-1, H], "token_rows_shape"))  # [N*S, H]
    nsd = g.one("Concat", [N, S, minus1], name="/sizes/N_S_minus1", axis=0)  # token rows -> [N, S, -1]
    # ParScale prefix rows of a first prompt (M = 0 rows in every other step); dropped after attention
    M = g.one("Gather", [g.one("Shape", [prefix_row_names(L)[0]], name="/prefix/shape"), one],
              name="/prefix/M", axis=0)  # [1]
    seqlens = g.one("Cast", [replicate(g.one("Cast", ["seqlens_k"], name="/replicate/seqlens_k/to64", to=TensorProto.INT64),
                                       [], "seqlens_k")], name="/replicate/seqlens_k/to32", to=TensorProto.INT32)
    big = g.const_i64([np.iinfo(np.int64).max], "int64_max")

    def linear(inp: str, layer: int, block: str, names: tuple[str, ...]) -> str:
        """One MatMul over the concatenated weights ``names`` of one block (output width the sum),
        named like the TorchScript export for one weight (``/model/layers.3/mlp/down_proj/MatMul``)
        or by :data:`PACKED` for several (``qkv_proj``, ``gate_up_proj``), so the quantizer maps it to
        its GGUF tensors; weights stored transposed [in, out]."""
        keys = [f"model.layers.{layer}.{block}.{n}" for n in names]
        name = names[0] if len(names) == 1 else PACKED[names]
        parts = [_np(sd[f"{k}.weight"]) for k in keys]
        w = g.init_typed(f"model.layers.{layer}.{block}.{name}.weight_t", np.concatenate(parts, axis=0).T, ht)
        scope = f"/model/layers.{layer}/{block}/{name}"
        if len(names) > 1:  # the quantizer splits a packed node whose GGUF parts differ in type
            packed_widths[f"{scope}/MatMul"] = [p.shape[0] for p in parts]
        y = g.one("MatMul", [inp, w], name=f"{scope}/MatMul")
        if f"{keys[0]}.bias" in sd:
            b = np.concatenate([_np(sd[f"{k}.bias"]) for k in keys])
            y = g.one("Add", [y, g.init_typed(f"model.layers.{layer}.{block}.{name}.bias", b, ht)], name=f"{scope}/Add")
        return y

    eps = float(cfg.rms_norm_eps)
    eps_c = g.init("rms_norm_eps", np.array(eps, np.float32))
    two = g.init("two_f32", np.array(2.0, np.float32))

    def rms_norm(inp: str, weight: str, scope: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w, decomposed (the ONNX checker does not know ORT's
        SimplifiedLayerNormalization); ONNX Runtime fuses this exact pattern back into it."""
        ms = g.one("ReduceMean", [g.one("Pow", [inp, two], name=f"{scope}/Pow")], name=f"{scope}/ReduceMean",
                   axes=[-1], keepdims=1)
        r = g.one("Sqrt", [g.one("Add", [ms, eps_c], name=f"{scope}/Add")], name=f"{scope}/Sqrt")
        return g.one("Mul", [g.one("Div", [inp, r], name=f"{scope}/Div"), weight], name=f"{scope}/Mul")

    inter2 = g.const_i64([cfg.intermediate_size, cfg.intermediate_size], "gate_up_split")
    packed_widths: dict[str, list[int]] = {}
    residual = x
    pending = None  # output of the previous block to add to the residual
    for i in range(L):
        pre = f"model.layers.{i}"
        w_in = g.init(f"{pre}.input_layernorm.weight", _np(sd[f"{pre}.input_layernorm.weight"]))
        if pending is None:
            h = rms_norm(residual, w_in, f"/model/layers.{i}/input_layernorm")
        else:
            h, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [pending, residual, w_in], n_out=4,
                                       name=f"/model/layers.{i}/input_layernorm", domain="com.microsoft", epsilon=eps)
        h = to_half(h, f"/model/layers.{i}/input_layernorm/to_half")
        # one MatMul; GroupQueryAttention takes packed QKV (key and value inputs empty)
        qkv = g.one("Reshape", [linear(h, i, "self_attn", ("q_proj", "k_proj", "v_proj")), nsd],
                    name=f"/model/layers.{i}/self_attn/qkv_3d")  # [N, S, (nh+2kv)*hd]
        # ParScale: prefix. A first prompt carries the prefix rows in front ([N, M+S, .]: zero
        # queries, the prefix keys and values); later steps find the prefix in the cache (M = 0)
        qkv = g.one("Concat", [prefix_row_names(L)[i], qkv], name=f"/model/layers.{i}/self_attn/prefix_rows", axis=1)
        o, _, _ = g.node("GroupQueryAttention",
                         [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens,
                          "total_sequence_length", *ROPE_INPUTS],
                         name=f"/model/layers.{i}/self_attn/GroupQueryAttention", domain="com.microsoft",
                         outputs=[f"/model/layers.{i}/self_attn/attn_out", f"present.{i}.key", f"present.{i}.value"],
                         num_heads=nh, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0,
                         scale=float(1.0 / np.sqrt(hd)))
        o = g.one("Slice", [o, M, big, one], name=f"/model/layers.{i}/self_attn/drop_prefix_rows")  # [N, S, .]
        o = g.one("Reshape", [o, g.const_i64([-1, nh * hd], "attn_rows_shape")], name=f"/model/layers.{i}/self_attn/rows")
        a = to_f32(linear(o, i, "self_attn", ("o_proj",)), f"/model/layers.{i}/self_attn/to_f32")
        w_post = g.init(f"{pre}.post_attention_layernorm.weight", _np(sd[f"{pre}.post_attention_layernorm.weight"]))
        h2, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [a, residual, w_post], n_out=4,
                                    name=f"/model/layers.{i}/post_attention_layernorm", domain="com.microsoft",
                                    epsilon=eps)
        h2 = to_half(h2, f"/model/layers.{i}/post_attention_layernorm/to_half")
        gate, up = g.node("Split", [linear(h2, i, "mlp", ("gate_proj", "up_proj")), inter2], n_out=2,
                          name=f"/model/layers.{i}/mlp/gate_up_split", axis=-1)
        act = g.one("Mul", [gate, g.one("Sigmoid", [gate], name=f"/model/layers.{i}/mlp/act/Sigmoid")],
                    name=f"/model/layers.{i}/mlp/act/Mul")
        pending = to_f32(linear(g.one("Mul", [act, up], name=f"/model/layers.{i}/mlp/Mul"), i, "mlp", ("down_proj",)),
                         f"/model/layers.{i}/mlp/to_f32")
    x = g.one("Add", [pending, residual], name="/model/final_residual/Add")  # [N*S, H]
    x = g.one("Reshape", [x, g.one("Concat", [N, S, Hc], name="/model/final_residual/shape", axis=0)],
              name="/model/final_residual/unflatten")  # [N, S, H]

    # ---- gather the requested positions first: final norm, aggregator and head see B*K rows only
    idx = replicate("logits_index", [g.one("Gather", [g.one("Shape", ["logits_index"], name="/gather/shape"),
                                                      one], name="/gather/K", axis=0)], "logits_index")  # [N, K]
    x = g.one("GatherND", [x, g.one("Unsqueeze", [idx, minus1], name="/gather/idx")], name="/gather/GatherND",
              batch_dims=1)  # [N, K, H]
    w_norm = g.init("model.norm.weight", _np(sd["model.norm.weight"]))
    x = rms_norm(x, w_norm, "/model/norm")

    # ---- ParScale: aggregate. [N, K, H] -> [B, P, K, H]; features interleaved h*P + p (authors' layout)
    K = g.one("Gather", [g.one("Shape", [x], name="/aggregate/x_shape"), one], name="/aggregate/K", axis=0)
    hs = g.one("Reshape", [x, g.one("Concat", [B, P, K, Hc], name="/aggregate/bpkh", axis=0)], name="/aggregate/split")
    feats = g.one("Transpose", [hs], name="/aggregate/interleave", perm=[0, 2, 3, 1])  # [B, K, H, P]
    PH = g.one("Mul", [P, Hc], name="/aggregate/PH")
    feats = g.one("Reshape", [feats, g.one("Concat", [B, K, PH], name="/aggregate/bk_ph", axis=0)],
                  name="/aggregate/feats")
    z = g.one("Add", [g.one("MatMul", [feats, AGG_INPUTS[0]], name="/model/aggregate_layer.0/MatMul"), AGG_INPUTS[1]],
              name="/model/aggregate_layer.0/Add")
    z = g.one("Mul", [z, g.one("Sigmoid", [z], name="/model/aggregate_layer.1/Sigmoid")], name="/model/aggregate_layer.1/Mul")
    z = g.one("Add", [g.one("MatMul", [z, AGG_INPUTS[2]], name="/model/aggregate_layer.2/MatMul"), AGG_INPUTS[3]],
              name="/model/aggregate_layer.2/Add")
    w = g.one("Softmax", [z], name="/model/aggregate_layer/Softmax", axis=-1)  # [B, K, P]
    # smoothing (an input: each P's parts carry their own epsilon, the backbone is shared)
    Pf = g.one("Cast", [P], name="/aggregate/Pf", to=TensorProto.FLOAT)
    keep = g.one("Sub", [g.init("aggregate.one", np.array(1.0, np.float32)), AGG_INPUTS[4]], name="/aggregate/keep_weight")
    w = g.one("Add", [g.one("Mul", [w, keep], name="/aggregate/keep"),
                      g.one("Div", [AGG_INPUTS[4], Pf], name="/aggregate/eps_over_P")],
              name="/aggregate/smoothed")
    wt = g.one("Unsqueeze", [g.one("Transpose", [w], name="/aggregate/w_t", perm=[0, 2, 1]), minus1],
               name="/aggregate/w_u")  # [B, P, K, 1]
    x = g.one("ReduceSum", [g.one("Mul", [hs, wt], name="/aggregate/weigh"), one], name="/aggregate/sum",
              keepdims=0)  # [B, K, H]

    # ---- lm_head on B*K rows. Tied: Gemm(transB=1) on the embedding itself (stored once).
    x2 = to_half(g.one("Reshape", [x, g.const_i64([-1, H])], name="/lm_head/flatten"), "/lm_head/to_half")
    if cfg.tie_word_embeddings:
        logits = g.one("Gemm", [x2, emb_w, g.init_typed("lm_head.zero_bias", np.zeros(V, np.float32), ht)],
                       name="/lm_head/Gemm", transB=1)
    else:
        logits = g.one("MatMul", [x2, g.init_typed("lm_head.weight_t", _np(sd["lm_head.weight"]).T, ht)],
                       name="/lm_head/MatMul")
    logits = to_f32(logits, "/lm_head/to_f32")  # float32 logits in every precision
    g.node("Reshape", [logits, g.one("Concat", [B, K, g.const_i64([V])], name="/lm_head/shape", axis=0)],
           name="/lm_head/unflatten", outputs=["logits"])

    graph = helper.make_graph(g.nodes, "parscale_fused_decoder", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="parscale-edge")
    proto.ir_version = 8
    proto.metadata_props.add(key=PACKED_WIDTHS_KEY, value=json.dumps(packed_widths))
    # every weight MatMul reads 2-D token rows: the quantizer may write its corrections as Gemm
    proto.metadata_props.add(key=TOKEN_ROWS_KEY, value="1")
    return proto


def same_backbone(a: LoadedModel, b: LoadedModel) -> bool:
    """True when the two models' backbone tensors (everything but the ParScale parts) are equal."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    keys = [k for k in sa if not is_parscale_tensor(k)]
    other = [k for k in sb if not is_parscale_tensor(k)]
    return sorted(keys) == sorted(other) and all(torch.equal(sa[k], sb[k]) for k in keys)


def export_fused(lm: LoadedModel, out_dir: str | os.PathLike, overwrite: bool = False, check: bool = True,
                 extra_parallel: list[LoadedModel] | tuple = (), precision: str = "fp32") -> Path:
    """Write the fused graph of ``lm`` and its ParScale parts to an export folder (atomically).

    The folder holds the backbone graph (``model.onnx`` + ``model.onnx.data``), the ParScale parts of
    P = ``lm``'s parscale_n under ``parscale/p{P}.safetensors`` (none for the dense P = 1; the P = 1
    prefix-tuning control, ``parscale_prefix_only``, has one: prefixes, no aggregator), the manifest
    (``graph: "fused"``, ``parallel_options``, default P = ``lm``'s) and the tokenizer files.
    ``extra_parallel``: more models over the same backbone (e.g. conversions of one dense model to other P);
    their parts are added, so one backbone serves every P (dynamic parallel scaling).
    ``precision`` fp32, fp16 or bf16 (see :func:`build_fused_graph`; ``manifest.cache_dtype`` float32,
    float16 or bfloat16). The part files are float32 in every precision: the runtime casts the
    prefixes to the cache dtype when it writes them into the cache.

    Raises FileExistsError (``out_dir`` exists, no ``overwrite``), ValueError (a model in ``extra_parallel``
    has another backbone or repeats a P, or an unknown precision) and :class:`parscale_edge.export.onnx_export.ExportError` when the
    ONNX checker rejects the graph.
    """
    from .onnx_export import save_checked, write_sidecars

    out = Path(out_dir)
    cfg = lm.model.config
    P = cfg.parscale_n
    models = {P: lm}
    for other in extra_parallel:
        q = other.model.config.parscale_n
        if q in models:
            raise ValueError(f"P={q} is given twice")
        if not same_backbone(lm, other):
            raise ValueError(f"the P={q} model has another backbone than the P={P} model; export it separately")
        models[q] = other
    if precision not in ELEM_TYPES:  # before the output folder is touched
        raise ValueError(f"unknown export precision {precision!r}; use {', '.join(ELEM_TYPES)}")
    with atomic_folder(out, overwrite) as tmp:
        proto = build_fused_graph(lm, precision=precision)
        meta = {"parscale_n": str(P), "parscale_n_tokens": str(cfg.parscale_n_tokens),
                "num_layers": str(cfg.num_hidden_layers), "producer": "parscale-edge", "graph": GRAPH_KIND,
                "precision": precision, "cache_dtype": CACHE_DTYPES[precision]}
        save_checked(proto, tmp, meta, check)
        del proto
        options: dict[int, str | None] = {}
        digest = None
        if len(models) > 1 or cfg.has_prefix:  # shared by every P; apply_adapter already hashed adapted models
            digest = next((m.notes["backbone_sha256"] for m in models.values() if "backbone_sha256" in m.notes),
                          None) or backbone_sha256(lm.model)
        for q, m in sorted(models.items()):
            # each part file is an adapter (parscale_edge.adapter format, backbone hash included)
            options[q] = f"{PARSCALE_DIR}/p{q}.safetensors" if m.model.config.has_prefix else None
            if options[q]:
                save_adapter(m.model, tmp / options[q], m.source, backbone_hash=digest)
        write_sidecars(lm, tmp, OPSET, precision, graph=GRAPH_KIND,
                        parallel_options={str(k): v for k, v in options.items()})
    return out
