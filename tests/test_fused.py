"""The fused graph (parscale_edge.export.onnx_builder) against the authors' golden logits, the reference graph and
itself: ragged batches, chunked prefill, P switching, preallocated-cache behaviour."""
import tracemalloc

import numpy as np
import pytest

from parscale_edge.loading import load_hf_folder
from parscale_edge.runtime import OnnxCausalLM, RuntimeInputError, SamplingConfig
from parscale_edge.export import export_model
from golden import GOLDEN, MODELS, fused_forward, run_cases
from tiny import tiny_model


def test_runs_on_the_onnxruntime_ci_asked_for():
    """.ci/ort_compat.sh runs this file under onnxruntime 1.31.1 (PARSCALE_EXPECT_ORT): make sure it did."""
    import os

    import onnxruntime

    want = os.environ.get("PARSCALE_EXPECT_ORT")
    if want is None:
        pytest.skip("PARSCALE_EXPECT_ORT not set (only .ci/ort_compat.sh pins the onnxruntime version)")
    assert onnxruntime.__version__ == want


@pytest.fixture(scope="module")
def golden_fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    out = {}
    for name in MODELS:
        lm = load_hf_folder(GOLDEN / name)
        out[name] = (lm, OnnxCausalLM(export_model(lm, root / name, graph="fused"), device="cpu", threads=1))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_fused_graph_matches_authors_golden_logits(golden_fused, name):
    lm, rt = golden_fused[name]
    assert rt.fused and rt.manifest.graph == "fused"
    errs = run_cases(GOLDEN / name, fused_forward(rt))
    assert len(errs) >= 9
    bad = {k: v for k, v in errs.items() if not v <= 1e-4}
    assert not bad, bad


@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_ragged_batch_equals_solo_runs_and_reference_graph(tmp_path, P):
    lm = tiny_model("qwen2", P=P, tie=P % 2 == 0, seed=P)
    fused = OnnxCausalLM(export_model(lm, tmp_path / "f", graph="fused"), device="cpu", threads=1)
    ref = OnnxCausalLM(export_model(lm, tmp_path / "r", graph="reference"), device="cpu", threads=1)
    rng = np.random.default_rng(P)
    prompts = [rng.integers(4, 97, n).tolist() for n in (3, 11)]
    greedy = SamplingConfig(max_new_tokens=32)
    together = fused.generate(prompts, greedy, eos_token_ids=[])
    assert together == [fused.generate([p], greedy, eos_token_ids=[])[0] for p in prompts]
    assert together == ref.generate(prompts, greedy, eos_token_ids=[])
    assert all(len(t) == 32 for t in together)
    # the short row's prefill logits equal its solo run's (1e-4)
    st, last = fused.prefill(prompts, 4)
    st1, solo = fused.prefill(prompts[:1], 4)
    np.testing.assert_allclose(last[0], solo[0], atol=1e-4)
    ids = np.array([prompts[1]])
    np.testing.assert_allclose(fused.score(ids), ref.score(ids), atol=1e-4)


def test_chunked_prefill_equals_one_prefill_at_every_position(tmp_path):
    lm = tiny_model("llama", P=2, tie=False, seed=5)
    rt = OnnxCausalLM(export_model(lm, tmp_path / "f", graph="fused"), device="cpu", threads=1)
    ids = np.random.default_rng(0).integers(4, 97, (2, 13))
    full = rt.score(ids)
    st = rt.new_state(2, 16)
    parts = [rt.step(st, ids[:, a:b], None, np.arange(b - a)[None].repeat(2, 0)) for a, b in ((0, 5), (5, 6), (6, 13))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-4)
    assert st.cache.lengths.tolist() == [13 + st.cache.n_prefix] * 2


def test_state_errors_name_both_sizes(tmp_path):
    lm = tiny_model("qwen2", P=2, seed=1)
    rt = OnnxCausalLM(export_model(lm, tmp_path / "f", graph="fused"), device="cpu", threads=1)
    st = rt.new_state(2, 4)
    with pytest.raises(RuntimeInputError, match="batch 3 but the KV cache was made for batch 2 .4 stream rows"):
        rt.step(st, np.ones((3, 1), np.int64))
    with pytest.raises(RuntimeInputError, match="does not fit"):
        rt.step(st, np.ones((2, 5), np.int64))
    st.close()
    with pytest.raises(RuntimeInputError, match="closed"):
        rt.step(st, np.ones((2, 1), np.int64))
    with pytest.raises(RuntimeInputError, match="offers P in \\[2\\]"):
        rt.new_state(1, 4, parallel=4)
    # token ids outside the vocabulary: a clear error before the graph runs (a negative id would
    # otherwise read another embedding row, a large one fail inside ONNX Runtime)
    V = rt.manifest.vocab_size
    with pytest.raises(RuntimeInputError, match=rf"token ids must be in \[0, {V}\) for this model; got -1..7"):
        rt.generate([[-1, 7]])
    with pytest.raises(RuntimeInputError, match=rf"got 5..{V}"):
        rt.score(np.array([[5, V]]))
    st, _ = rt.prefill([[5, 6]], 4)
    with pytest.raises(RuntimeInputError, match=rf"got {V}..{V}"):
        rt.decode(st, np.array([V]))
    assert st.cache.lengths.tolist() == [2 + rt.prefix_slots()]  # the refused step changed nothing


def test_decode_steps_allocate_nothing_that_grows(tmp_path):
    lm = tiny_model("qwen2", P=2, seed=2)
    rt = OnnxCausalLM(export_model(lm, tmp_path / "f", graph="fused"), device="cpu", threads=1)
    st, logits = rt.prefill([[5, 6, 7]], 100)
    buffers = [b.ctypes.data for b in st.cache.tensors]
    logits = rt.decode(st, logits.argmax(-1))  # the first decode step binds its small arrays once
    peaks = []
    for window in range(3):
        tracemalloc.start()
        for _ in range(30):
            logits = rt.decode(st, logits.argmax(-1))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert [b.ctypes.data for b in st.cache.tensors] == buffers  # the same cache memory all along
    assert st.cache.lengths[0] == st.cache.n_prefix + 3 + 91
    assert max(peaks) - min(peaks) < 4096, peaks  # steps 60-90 need no more memory than steps 0-30
    assert max(peaks) < 64 * 1024  # and the per-step traffic is small (logits of one row: 388 bytes)


def test_one_backbone_serves_several_p(tmp_path):
    """Dynamic parallel scaling: conversions of one dense model share the backbone export; each P
    run from the shared folder equals the same P exported alone."""
    from parscale_edge.loading import convert_to_parscale
    from parscale_edge.cli import main

    dense = tiny_model("llama", P=1, tie=True, seed=7)
    convs = {P: convert_to_parscale(dense, P, n_tokens=3) for P in (2, 4)}
    shared = OnnxCausalLM(export_model(dense, tmp_path / "shared", graph="fused", extra_parallel=list(convs.values())),
                          device="cpu", threads=1)
    assert shared.parallel_choices == [1, 2, 4] and shared.P == 1
    ids = np.random.default_rng(3).integers(4, 97, (1, 9))
    for P, conv in convs.items():
        alone = OnnxCausalLM(export_model(conv, tmp_path / f"p{P}", graph="fused"), device="cpu", threads=1)
        np.testing.assert_allclose(shared.score(ids, parallel=P), alone.score(ids), atol=1e-5)
        assert shared.generate([ids[0].tolist()], SamplingConfig(max_new_tokens=8), [], parallel=P) == \
            alone.generate([ids[0].tolist()], SamplingConfig(max_new_tokens=8), [])
    np.testing.assert_allclose(shared.score(ids, parallel=1), OnnxCausalLM(
        export_model(dense, tmp_path / "p1", graph="fused"), device="cpu", threads=1).score(ids), atol=1e-6)
    other = tiny_model("llama", P=1, tie=True, seed=8)
    with pytest.raises(ValueError, match="another backbone"):
        export_model(dense, tmp_path / "bad", graph="fused", extra_parallel=[convert_to_parscale(other, 2)])
    assert main(["generate", "--model", str(tmp_path / "shared"), "-P", "3", "-p", "x"]) == 2


def test_p1_feeds_the_narrowest_aggregator_the_graph_takes(tmp_path):
    """P = 1 runs a zero aggregator (softmax over one stream is 1): width 1 where the graph's
    aggregator width is dynamic, [H, H] zeros for exports that declare it as H; same logits."""
    import onnx

    folder = export_model(tiny_model("llama", P=1, tie=True, seed=4), tmp_path / "f", graph="fused")
    rt = OnnxCausalLM(folder, device="cpu", threads=1)
    ids = np.random.default_rng(4).integers(4, 97, (2, 7))
    new = rt.score(ids)
    assert rt._parallel_parts(1)["agg"]["parscale.aggregate.w1"].shape()[1] == 1
    H = rt.manifest.hidden_size
    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for i in m.graph.input:  # an export from before the width was dynamic
        for d in i.type.tensor_type.shape.dim:
            if d.dim_param == "aggregator_width":
                d.dim_value = H
    onnx.save(m, str(folder / "model_static_agg.onnx"))
    old = OnnxCausalLM(folder, device="cpu", threads=1, model_file="model_static_agg.onnx")
    assert old._parallel_parts(1)["agg"]["parscale.aggregate.w1"].shape() == [H, H]
    np.testing.assert_allclose(old.score(ids), new, atol=1e-6)


@pytest.mark.parametrize("damage", ["head_dim", "truncated_data", "parts"])
def test_damaged_fused_folder_is_refused_at_load(tmp_path, damage):
    import json
    import shutil

    from parscale_edge.manifest import ManifestError

    lm = tiny_model("qwen2", P=2, seed=4)
    d = export_model(lm, tmp_path / "f", graph="fused")
    if damage == "head_dim":
        man = json.loads((d / "manifest.json").read_text())
        man["head_dim"] = 32
        (d / "manifest.json").write_text(json.dumps(man))
    elif damage == "truncated_data":
        data = d / "model.onnx.data"
        data.write_bytes(data.read_bytes()[:1000])
    else:
        shutil.rmtree(d / "parscale")
    with pytest.raises((ManifestError, ValueError)) as e:
        rt = OnnxCausalLM(d, device="cpu", threads=1)
        rt.generate([[5, 6]], SamplingConfig(max_new_tokens=2))
    assert str(d) in str(e.value) or "p2.safetensors" in str(e.value)


# ------------------------------------------------------------- onnxruntime 1.31 (the GPU build)
def test_graph_feeds_group_query_attention_only_what_onnxruntime_1_31_takes(tmp_path):
    """No query_seqlens (new in 1.32) and no position_ids (refused by some CUDA releases, ignored by
    the CPU kernel on a first prompt): positions come from the cache slot and the RoPE tables."""
    import onnx

    from parscale_edge.manifest import ROPE_INPUTS, prefix_row_names

    d = export_model(tiny_model("qwen2", P=2, seed=1), tmp_path / "f", graph="fused")
    g = onnx.load(str(d / "model.onnx"), load_external_data=False).graph
    names = [i.name for i in g.input]
    assert "query_seqlens" not in names and "position_ids" not in names
    assert set(ROPE_INPUTS) <= set(names) and set(prefix_row_names(2)) <= set(names)
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(len(n.input) == 9 and list(n.input[7:]) == list(ROPE_INPUTS) for n in gqa)


def test_rope_tables_are_identity_on_prefix_slots_then_the_dense_positions():
    from parscale_edge.manifest import rope_tables

    cos, sin = rope_tables(20, 6, 16, 10000.0)
    cos0, sin0 = rope_tables(14, 0, 16, 10000.0)
    assert cos.shape == sin.shape == (20, 8) and cos.dtype == np.float32
    assert (cos[:6] == 1).all() and (sin[:6] == 0).all()
    assert np.array_equal(cos[6:], cos0) and np.array_equal(sin[6:], sin0)
    p = np.arange(14)[:, None] / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(cos0, np.cos(p), atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_first_prompt_leaves_the_prefix_in_the_cache_bit_exact(tmp_path, precision):
    """A first prompt writes the prefix rows through GroupQueryAttention at RoPE row 0..n-1, the
    identity: the cache's prefix slots must hold exactly what new_state put there."""
    lm = tiny_model("qwen2", P=2, seed=4)
    rt = OnnxCausalLM(export_model(lm, tmp_path / "f", graph="fused", precision=precision), device="cpu", threads=1)
    st = rt.new_state(2, 12)
    n = st.cache.n_prefix
    assert n > 0
    before = [b[:, :, :n].copy() for b in st.cache.tensors]
    rt.step(st, np.random.default_rng(0).integers(4, 97, (2, 9)), np.array([9, 4]))
    for a, b in zip(before, st.cache.tensors):
        assert np.array_equal(a, b[:, :, :n])
    assert st.cache.lengths.tolist() == [n + 9, n + 4]


@pytest.mark.parametrize("P", [1, 2])
def test_a_later_chunk_equals_one_prefill_for_a_single_row(tmp_path, P):
    """After a first prompt, a multi-token chunk runs in one call for one cache row (P = 1, B = 1) and
    token by token otherwise (P = 2): both give the logits of one prefill at every position."""
    lm = tiny_model("llama", P=P, tie=False, seed=6)
    rt = OnnxCausalLM(export_model(lm, tmp_path / "f", graph="fused"), device="cpu", threads=1)
    ids = np.random.default_rng(1).integers(4, 97, (1, 12))
    full = rt.score(ids)
    st = rt.new_state(1, 12)
    parts = [rt.step(st, ids[:, a:b], None, np.arange(b - a)[None]) for a, b in ((0, 4), (4, 11), (11, 12))]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-4)


def test_each_p_runs_with_its_own_smoothing_over_a_shared_backbone(tmp_path):
    """The aggregator's smoothing epsilon comes with each P's parts: a dense backbone whose config
    keeps the authors' class default 0.01 must not impose it on a P=2 adapter trained with 0.1."""
    import torch

    from parscale_edge.loading import convert_to_parscale

    dense = tiny_model("llama", P=1, tie=True, seed=9)
    dense.model.config.parscale_attn_smooth = 0.01
    p2 = convert_to_parscale(dense, 2, n_tokens=3)
    assert p2.model.config.parscale_attn_smooth == 0.1
    with torch.no_grad():  # a trained-looking, non-uniform aggregator
        for prm in p2.model.model.aggregate_layer.parameters():
            prm.copy_(torch.randn_like(prm))
    shared = OnnxCausalLM(export_model(dense, tmp_path / "shared", graph="fused", extra_parallel=[p2]), device="cpu", threads=1)
    alone = OnnxCausalLM(export_model(p2, tmp_path / "alone", graph="reference"), device="cpu", threads=1)
    ids = np.random.default_rng(2).integers(4, 97, (1, 9))
    np.testing.assert_allclose(shared.score(ids, parallel=2), alone.score(ids), atol=1e-4)


def test_both_graphs_declare_the_manifests_inputs_outputs_and_row_orders(tmp_path):
    """parscale_edge.manifest is the contract of both graphs: their input and output names in
    order, and the cache row of stream p of user row b."""
    import onnx

    from parscale_edge.kv_cache import KVCache
    from parscale_edge.manifest import cache_row, graph_inputs, graph_outputs

    lm = tiny_model("qwen2", P=2, seed=2)
    L = lm.model.config.num_hidden_layers
    for graph in ("reference", "fused"):
        g = onnx.load(str(export_model(lm, tmp_path / graph, graph=graph) / "model.onnx"), load_external_data=False).graph
        assert [i.name for i in g.input] == graph_inputs(graph, L)
        assert [o.name for o in g.output] == graph_outputs(L)
    assert [cache_row("reference", p, b, 2, 3) for b in range(3) for p in range(2)] == [0, 3, 1, 4, 2, 5]
    assert [cache_row("fused", p, b, 2, 3) for b in range(3) for p in range(2)] == [0, 1, 2, 3, 4, 5]
    rt = OnnxCausalLM(tmp_path / "fused", device="cpu", threads=1)
    st = rt.new_state(3, 4)
    assert (st.cache.row_order, st.cache.row(1, 0), st.cache.P * st.cache.batch) == ("batch-major", 1, 6)
    ref = KVCache.empty(OnnxCausalLM(tmp_path / "reference", device="cpu", threads=1).manifest, 3)
    assert (ref.row_order, ref.row(1, 0), ref.tensors[0].shape[0]) == ("stream-major", 3, 6)
