"""Row 4, baked shapes: no Reshape/Expand/Tile in the exported graph takes a constant equal to the
export's dummy batch, length, past or their products (they would make the graph run only at the
traced sizes), and the graph runs over a B/S/past grid far from those sizes."""
import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.export import export_onnx
from parscale_edge.export.onnx_export import _DUMMY_B, _DUMMY_PAST, _DUMMY_S
from tiny import tiny_model

# 8 query heads over 2 KV heads (GQA repeat 4), head_dim 8, hidden 64: no config value equals a dummy size.
CFG = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96, head_dim=8)
_PASS_THROUGH = ("Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Mul", "Add")


def shape_constants(model: onnx.ModelProto) -> dict[str, set[int]]:
    """node name -> integer constants that reach the shape/repeats input of a Reshape/Expand/Tile,
    following Concat/Unsqueeze/Cast/... back to Constant nodes and initializers."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
             if i.data_location != onnx.TensorProto.EXTERNAL}  # weights; shapes are small, inline tensors
    producer = {o: n for n in model.graph.node for o in n.output}

    def consts(name, depth=0):
        if name in inits:
            v = inits[name]
            return set(v.reshape(-1).tolist()) if v.dtype.kind in "iu" and v.size < 16 else set()
        n = producer.get(name)
        if n is None or depth > 8:
            return set()
        if n.op_type == "Constant":
            v = numpy_helper.to_array(n.attribute[0].t)
            return set(v.reshape(-1).tolist()) if v.dtype.kind in "iu" else set()
        if n.op_type in _PASS_THROUGH:
            return set().union(*(consts(i, depth + 1) for i in n.input if i))
        return set()  # Shape, Gather, ...: computed from the inputs at run time

    return {n.name: consts(n.input[1]) for n in model.graph.node if n.op_type in ("Reshape", "Expand", "Tile")}


@pytest.fixture(scope="module", params=[1, 2, 4, 8])
def export(request, tmp_path_factory):
    lm = tiny_model("qwen2", request.param, seed=request.param, **CFG)
    return lm, OnnxCausalLM(export_onnx(lm, tmp_path_factory.mktemp("baked") / f"p{request.param}"), "cpu", 1)


def test_no_dummy_size_is_baked_into_the_graph(export):
    lm, rt = export
    cfg = lm.model.config
    P, B, S, past = cfg.parscale_n, _DUMMY_B, _DUMMY_S, _DUMMY_PAST
    dummy = {B, S, past, past + S, P * B, cfg.parscale_n_tokens + past + S, P * B * S}
    legit = {cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, P, P * cfg.hidden_size,
             cfg.num_attention_heads // cfg.num_key_value_heads, cfg.parscale_n_tokens, cfg.vocab_size}
    assert not dummy & legit  # the test config keeps the two apart, so a hit below is a baked size
    found = shape_constants(onnx.load(str(rt.folder / "model.onnx"), load_external_data=False))
    assert found, "no Reshape/Expand/Tile found: the check would be empty"
    baked = {name: sorted(vals & dummy) for name, vals in found.items() if vals & dummy}
    assert not baked, f"dummy sizes {dummy} baked into {baked}"


def test_graph_runs_over_a_grid_far_from_the_dummy_sizes(export):
    lm, rt = export
    cfg = lm.model.config
    rng = np.random.default_rng(0)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    for B, S, past in itertools.product([1, 4], [1, 6, 11], [0, 2, 9]):
        T = past + S
        ids = rng.integers(0, cfg.vocab_size, (B, T))
        mask = np.ones((B, T), np.int64)
        pos = np.arange(T)[None].repeat(B, 0)
        with torch.no_grad():
            _, cache = lm.model(t(ids[:, :past]), t(mask[:, :past]), t(pos[:, :past])) if past else (None, ())
            ref, _ = lm.model(t(ids[:, past:]), t(mask), t(pos[:, past:]), cache)
        got, present = rt.forward(ids[:, past:], mask, pos[:, past:], [c.numpy() for c in cache] if past else None)
        assert got.shape == (B, S, cfg.vocab_size) and present[0].shape[::2] == (cfg.parscale_n * B, T)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=0, err_msg=f"B={B} S={S} past={past}")
