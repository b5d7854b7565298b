"""The fused graph in half precision (issue 9: ONNX Runtime's CUDA GroupQueryAttention is fp16/bf16
only, so this is the graph that runs on a GPU). What a CPU can check: fp16 runs on the CPU provider
(golden logits, fp32 agreement, massive activations, several P over one backbone, the device-memory
cache path); bf16 has no CPU MatMul, so its graph is checked statically (dtypes, ops the CUDA
provider runs in bfloat16). bench/gpu_check.sh runs both on CUDA."""
import ctypes
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from parscale_edge.loading import convert_to_parscale, load_hf_folder
from parscale_edge.kv_cache import KVCache, bfloat16_bits, cache_host_array
from parscale_edge.manifest import AGG_INPUTS, Manifest, ManifestError
from parscale_edge.runtime import OnnxCausalLM, SamplingConfig
from parscale_edge.export import export_model
from parscale_edge.export.onnx_builder import build_fused_graph
from golden import GOLDEN, MODELS, fused_forward, run_cases
from test_precision import CUDA_BF16_OPS
from tiny import massive_activation_model, tiny_model

F32, F16, BF16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
HALF = {"fp16": F16, "bf16": BF16}


@pytest.fixture(scope="module")
def golden_fused(tmp_path_factory):
    """{(golden name, precision): OnnxCausalLM} for fused fp32 and fp16 exports on the CPU."""
    root = tmp_path_factory.mktemp("fused_half")
    return {(name, prec): OnnxCausalLM(export_model(load_hf_folder(GOLDEN / name), root / f"{name}-{prec}",
                                                    graph="fused", precision=prec), device="cpu", threads=1)
            for name in MODELS for prec in ("fp32", "fp16")}


def _golden_logits(rt: OnnxCausalLM, name: str) -> tuple[np.ndarray, dict]:
    """Logits at every compared position of the golden cases, and the errors against the authors'."""
    seen = []
    forward = fused_forward(rt)

    def fwd(ids, mask, pos, state):
        logits, state = forward(ids, mask, pos, state)
        seen.append(logits[mask[:, -ids.shape[1]:].astype(bool)])
        return logits, state

    errs = run_cases(GOLDEN / name, fwd)
    return np.concatenate(seen), errs


@pytest.mark.parametrize("name", MODELS)
def test_fused_fp16_reproduces_golden_logits_and_fp32_top1(golden_fused, name):
    f16, f32 = golden_fused[name, "fp16"], golden_fused[name, "fp32"]
    man = f16.manifest
    assert (man.graph, man.precision, man.cache_dtype) == ("fused", "fp16", "float16")
    a, err32 = _golden_logits(f32, name)
    b, err16 = _golden_logits(f16, name)
    assert max(err32.values()) <= 1e-4
    # fp16 weights, matmuls and cache, fp32 residual/norms/aggregator: logits of magnitude ~10 move by ~0.01
    assert 1e-4 < max(err16.values()) < 0.03, err16
    assert len(a) >= 100 and float((a.argmax(-1) == b.argmax(-1)).mean()) >= 0.99
    st, logits = f16.prefill([[5, 6, 7]], 4)
    assert logits.dtype == np.float32 and all(buf.dtype == np.float16 for buf in st.cache.tensors)
    assert st.cache.nbytes == 2 * man.num_layers * man.parscale_n * man.num_key_value_heads * st.cache.capacity * man.head_dim * 2


def _typed_graph(lm, precision: str) -> tuple[onnx.GraphProto, dict[str, int]]:
    """The fused graph with every tensor's element type (ONNX Runtime's symbolic shape inference
    knows the com.microsoft ops; ONNX's own leaves their outputs untyped)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    g = SymbolicShapeInference.infer_shapes(build_fused_graph(lm, precision=precision), auto_merge=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return g, {k: v for k, v in types.items() if v}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_fused_half_graph_keeps_residual_norms_aggregator_and_logits_in_float32(precision, tie):
    lm = tiny_model("qwen2", P=2, tie=tie, seed=3)
    g, types = _typed_graph(lm, precision)
    half = HALF[precision]
    floats = lambda n: {types[x] for x in [*n.input, *n.output] if x in types and types[x] in (F32, F16, BF16)}  # noqa: E731
    ins = {i.name: i.type.tensor_type.elem_type for i in g.input}
    outs = {o.name: o.type.tensor_type.elem_type for o in g.output}
    assert outs["logits"] == F32 and all(ins[n] == F32 for n in AGG_INPUTS)
    assert {ins["past_key_values.0.key"], outs["present.1.value"]} == {half}
    L = lm.model.config.num_hidden_layers
    seen = {"skip_norm": 0, "norm": 0, "aggregate": 0, "attention": 0, "matmul": 0}
    for n in g.node:
        if n.op_type == "SkipSimplifiedLayerNormalization":  # residual add + RMSNorm
            seen["skip_norm"] += 1
            assert floats(n) == {F32}, n.name
        elif n.op_type in ("Pow", "ReduceMean", "Sqrt", "Div") and "norm" in n.name:  # decomposed RMSNorms
            seen["norm"] += 1
            assert floats(n) == {F32}, n.name
        elif "aggregate" in n.name and floats(n):
            seen["aggregate"] += 1
            assert floats(n) == {F32}, n.name
        elif n.op_type == "GroupQueryAttention":
            seen["attention"] += 1
            assert floats(n) == {half}, n.name  # query, cache, RoPE tables, output
        elif n.op_type in ("MatMul", "Gemm"):
            seen["matmul"] += 1
            assert floats(n) == {half} and types[n.input[1]] == half, n.name
    # layer 0's input norm and the final norm are decomposed (4 ops each), the other 2L-1 are fused
    # with their residual add; qkv, o, gate_up, down per layer and the head are half MatMuls
    assert seen == {"skip_norm": 2 * L - 1, "norm": 4 * 2, "aggregate": seen["aggregate"], "attention": L,
                    "matmul": 4 * L + 1}
    assert seen["aggregate"] >= 10  # MatMul, Add, Sigmoid, Mul, Softmax, weighted sum, ...
    final = next(n for n in g.node if n.name == "/model/final_residual/Add")
    assert floats(final) == {F32}
    big = [i for i in g.initializer if len(i.dims) == 2]  # every weight matrix, the embedding and RoPE tables
    assert big and all(i.data_type == half for i in big), [(i.name, i.data_type) for i in big if i.data_type != half]
    if precision == "bf16":
        bf16_ops = {n.op_type for n in g.node if BF16 in floats(n)}
        assert {"MatMul", "GroupQueryAttention", "Cast"} <= bf16_ops
        assert bf16_ops <= CUDA_BF16_OPS | {"GroupQueryAttention"}, bf16_ops - CUDA_BF16_OPS


def test_fused_fp16_of_a_model_with_massive_activations_has_no_nan_on_512_tokens(tmp_path):
    lm = massive_activation_model()
    peak = {}
    hook = lm.model.model.layers[-1].register_forward_hook(lambda m, a, o: peak.__setitem__("x", o[0].abs().max()))
    ids = np.random.default_rng(0).integers(0, 97, (1, 512))
    with torch.no_grad():
        t = torch.from_numpy(ids)
        lm.model(t, torch.ones_like(t), torch.arange(512)[None])
    hook.remove()
    assert peak["x"] > 65504  # the residual stream really leaves fp16's range
    out = {}
    for prec in ("fp32", "fp16"):
        rt = OnnxCausalLM(export_model(massive_activation_model(), tmp_path / prec, graph="fused", precision=prec),
                          device="cpu", threads=1)
        st = rt.new_state(1, 520)
        logits = rt.step(st, ids, None, np.arange(512)[None])[0]  # every position of the 512-token prompt
        steps = [rt.decode(st, logits[-1:].argmax(-1))]
        for _ in range(3):
            steps.append(rt.decode(st, steps[-1].argmax(-1)))
        assert np.isfinite(logits).all() and np.isfinite(np.concatenate(steps)).all(), prec
        assert all(np.isfinite(b.astype(np.float32)).all() for b in st.cache.tensors), prec
        out[prec] = np.concatenate([logits, *steps])
    a, b = out["fp32"], out["fp16"]
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.99


def test_fp16_backbone_serves_several_p_and_keeps_float32_part_files(tmp_path):
    """Dynamic parallel scaling in fp16: one half-precision backbone, float32 ParScale part files,
    prefixes rounded to float16 when written into the cache; each P equals its own fp16 export."""
    from safetensors.numpy import load_file

    dense = tiny_model("llama", P=1, tie=True, seed=7)
    convs = {P: convert_to_parscale(dense, P, n_tokens=3) for P in (2, 4)}
    shared_dir = export_model(dense, tmp_path / "shared", graph="fused", extra_parallel=list(convs.values()), precision="fp16")
    shared = OnnxCausalLM(shared_dir, device="cpu", threads=1)
    fp32 = OnnxCausalLM(export_model(dense, tmp_path / "fp32", graph="fused", extra_parallel=list(convs.values())),
                        device="cpu", threads=1)
    assert shared.parallel_choices == [1, 2, 4] and shared.manifest.cache_dtype == "float16"
    ids = np.random.default_rng(3).integers(4, 97, (1, 24))
    greedy = SamplingConfig(max_new_tokens=8)
    for P, conv in convs.items():
        parts = load_file(str(shared_dir / shared.manifest.parallel_options[str(P)]))
        assert {a.dtype for a in parts.values()} == {np.dtype(np.float32)}
        alone = OnnxCausalLM(export_model(conv, tmp_path / f"p{P}", graph="fused", precision="fp16"), device="cpu",
                             threads=1)
        np.testing.assert_allclose(shared.score(ids, parallel=P), alone.score(ids), atol=1e-5)
        assert shared.generate([ids[0].tolist()], greedy, [], parallel=P) == alone.generate([ids[0].tolist()], greedy, [])
        a, b = fp32.score(ids, parallel=P), shared.score(ids, parallel=P)
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95 and np.abs(a - b).max() < 0.05 * np.abs(a).max()
        st = shared.new_state(2, 4, parallel=P)  # the prefix of layer 0, stream 1, row 1 of two: fp16-rounded
        k = parts["model.layers.0.self_attn.prefix_k"]
        np.testing.assert_array_equal(st.cache.tensors[0][1 * P + 1, :, :3], k[1].astype(np.float16))
        assert st.cache.tensors[0][:, :, 3:].max() == 0
    shared.set_parallel(2)
    assert len(shared.generate([[5, 6, 7]], greedy, [])[0]) == 8


def test_auto_picks_the_fused_graph_for_half_precision_and_falls_back_to_reference(tmp_path):
    man = Manifest.read(export_model(tiny_model(P=2, seed=1), tmp_path / "auto", precision="fp16"))
    assert (man.graph, man.precision, man.cache_dtype) == ("fused", "fp16", "float16")
    odd = tiny_model(P=2, seed=1, head_dim=8)  # GroupQueryAttention needs head_dim % 16 == 0
    with pytest.warns(UserWarning, match="exporting the reference graph: head_dim 8"):
        man = Manifest.read(export_model(odd, tmp_path / "ref", precision="fp16"))
    assert (man.graph, man.precision, man.cache_dtype) == ("reference", "fp16", "float16")
    with pytest.raises(ValueError, match="cannot build the fused graph: head_dim 8"):
        export_model(tiny_model(P=2, seed=1, head_dim=8), tmp_path / "x", graph="fused", precision="bf16")
    with pytest.raises(ValueError, match="unknown export precision 'fp8'; use fp32, fp16, bf16"):
        export_model(tiny_model(seed=1), tmp_path / "y", graph="fused", precision="fp8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    bf = Manifest.read(export_model(tiny_model(P=2, seed=1), tmp_path / "bf", precision="bf16"))
    assert (bf.graph, bf.cache_dtype) == ("fused", "bfloat16")
    with pytest.raises(ManifestError, match="bf16 export, which ONNX Runtime runs on its CUDA provider only"):
        OnnxCausalLM(tmp_path / "bf", device="cpu")


def test_bfloat16_bits_round_to_nearest_even_like_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 10000),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, 1.0 + 2 ** -8,
                                  1.0 + 3 * 2 ** -8, 65504.0, 9e4], np.float32)])
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bfloat16_bits(x), want)
    nan = bfloat16_bits(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(torch.from_numpy(nan.view(np.int16)).view(torch.bfloat16).float().numpy()).all()
    assert bfloat16_bits(np.array([1.0 + 2 ** -8], np.float32))[0] == 0x3F80  # a tie rounds to even (down)
    assert bfloat16_bits(np.array([1.0 + 3 * 2 ** -8], np.float32))[0] == 0x3F82  # ... and up
    assert cache_host_array(np.ones(3, np.float32), "float16").dtype == np.float16
    with pytest.raises(ManifestError, match="unknown KV cache dtype 'float8'"):
        cache_host_array(x, "float8")


def _read_back(v, shape, dtype) -> np.ndarray:
    """A CPU OrtValue's memory as numpy (bfloat16: uint16 bits; numpy cannot convert it)."""
    n = int(np.prod(shape))
    buf = (ctypes.c_uint8 * (n * np.dtype(dtype).itemsize)).from_address(v.data_ptr())
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


@pytest.mark.parametrize("cache_dtype", ["float32", "float16", "bfloat16"])
def test_device_memory_cache_holds_the_same_bits_as_the_host_cache(cache_dtype):
    """The CUDA path (OrtValues filled through one reused staging array) run with CPU memory."""
    P, B, kv, cap, hd, n, L = 2, 3, 2, 9, 16, 4, 2
    rng = np.random.default_rng(1)
    prefix = [tuple(cache_host_array(rng.standard_normal((P, kv, n, hd)).astype(np.float32), cache_dtype)
                    for _ in range(2)) for _ in range(L)]
    shape = (P * B, kv, cap, hd)
    host_cache = KVCache.allocate(shape, L, cache_dtype, P, prefix)
    dev_cache = KVCache.allocate(shape, L, cache_dtype, P, prefix, "cpu", device_memory=True)
    host, host_values, dev, dev_values = host_cache.tensors, host_cache.values, dev_cache.tensors, dev_cache.values
    assert dev is dev_values and len(dev) == 2 * L and not isinstance(dev[0], np.ndarray)
    onnx_type = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}
    for j in range(2 * L):
        assert dev[j].data_type() == host_values[j].data_type() == onnx_type[cache_dtype]
        got = _read_back(dev[j], shape, host[j].dtype)
        np.testing.assert_array_equal(got, host[j])
        np.testing.assert_array_equal(got.reshape(B, P, kv, cap, hd)[2, 1, :, :n], prefix[j // 2][j % 2][1])
        assert not got[:, :, n:].any()
    assert dev_cache.nbytes == sum(h.nbytes for h in host) == 2 * L * P * B * kv * cap * hd * host[0].itemsize


def test_fused_fp16_decodes_the_same_with_a_device_memory_cache(tmp_path, monkeypatch):
    """The runtime with its CUDA cache path (device OrtValues, no host copy) forced on the CPU gives
    the same tokens and cache size as the numpy cache."""
    lm = tiny_model("qwen2", P=2, seed=5)
    lm.model.init_parscale()
    rt = OnnxCausalLM(export_model(lm, tmp_path / "f", graph="fused", precision="fp16"), device="cpu", threads=1)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    greedy = SamplingConfig(max_new_tokens=12)
    want = rt.generate(prompts, greedy, [])
    st, _ = rt.prefill(prompts, 12)
    want_bytes = st.cache.nbytes
    alloc = KVCache.allocate
    monkeypatch.setattr(KVCache, "allocate", lambda *a, **k: alloc(*a, **{**k, "device_memory": True}))
    st, _ = rt.prefill(prompts, 12)
    assert not isinstance(st.cache.tensors[0], np.ndarray) and st.cache.nbytes == want_bytes
    assert rt.generate(prompts, greedy, []) == want


def test_int4_from_a_fused_fp16_export_keeps_fp16_activations_and_cache(tmp_path):
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder

    lm = tiny_model("qwen2", P=2, seed=3)
    lm.model.init_parscale()
    src = export_model(lm, tmp_path / "f16", graph="fused", precision="fp16")
    out = quantize_folder(src, tmp_path / "q4", QuantConfig(precision="int4", accuracy_level=0, block_size=16),
                          check_positions=0, compare_positions=64)
    man = Manifest.read(out)
    assert (man.graph, man.precision, man.cache_dtype, man.quantization["source_precision"]) == \
        ("fused", "int4", "float16", "fp16")
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 2 + 1  # qkv, o, gate_up, down per layer + lm_head
    scales = {i.name: i.data_type for i in g.initializer}
    assert all(scales[n.input[2]] == F16 for n in nbits)  # fp16 scales: fp16 activations
    rt = OnnxCausalLM(out, device="cpu", threads=1)
    st, logits = rt.prefill([[5, 6, 7]], 4)
    assert np.isfinite(logits).all() and st.cache.tensors[0].dtype == np.float16
    # random weights at block 16: rounding shows, nothing breaks (real-model bounds: the GPU check)
    q = man.quantization["quality_vs_fp32"]
    assert q["positions"] == 64 and 0 < q["kl_mean"] < 0.5


def test_fused_export_metadata_names_precision_and_cache_dtype(tmp_path):
    d = export_model(tiny_model(seed=2), tmp_path / "f", graph="fused", precision="bf16")
    meta = {p.key: p.value for p in onnx.load(str(d / "model.onnx"), load_external_data=False).metadata_props}
    assert (meta["graph"], meta["precision"], meta["cache_dtype"]) == ("fused", "bf16", "bfloat16")
    assert json.loads((d / "manifest.json").read_text())["cache_dtype"] == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fused fp32 folder on the CPU: no CUDA warning
        OnnxCausalLM(export_model(tiny_model(seed=2), tmp_path / "f32", graph="fused"), device="cpu", threads=1)


def test_fused_graph_on_an_older_onnxruntime_is_refused_with_the_version(tmp_path, monkeypatch):
    """Fused graphs are tested on onnxruntime 1.31 (onnxruntime-gpu's newest release as this is
    written) and later; an older one is refused in one line naming both versions, and a fused
    folder of export format 2 (GroupQueryAttention's query_seqlens, 1.32 only) asks for a re-export."""
    import json

    import onnxruntime as ort

    from parscale_edge.runtime import FUSED_MIN_ORT, ort_version

    assert ort_version("1.31.1") == (1, 31) and ort_version("1.33.0.dev20260101") == (1, 33) and ort_version("2") == (2, 0)
    assert FUSED_MIN_ORT == (1, 31)
    d = export_model(tiny_model(seed=2), tmp_path / "f", graph="fused", precision="fp16")
    monkeypatch.setattr(ort, "__version__", "1.30.0")
    with pytest.raises(ManifestError, match=r"fused graph, which needs onnxruntime >= 1.31; this is onnxruntime "
                                            r"1.30.0: upgrade onnxruntime"):
        OnnxCausalLM(d, device="cpu")
    monkeypatch.undo()
    man = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**man, "format_version": 2}))
    with pytest.raises(ManifestError, match=r"fused graph of export format 2 .* export the model again"):
        OnnxCausalLM(d, device="cpu")
