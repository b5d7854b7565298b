"""Half-precision exports (fp16 / bf16): what the CPU can check.

fp16 runs on ONNX Runtime's CPU provider, so its logits are compared with the fp32 export and the
authors' golden logits here. bf16 has no CPU MatMul kernel: its graph is checked for dtypes and for
ops that ONNX Runtime's CUDA provider runs in bfloat16; running it is bench/gpu_check.sh's job.
"""
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from parscale_edge.loading import load_hf_folder
from parscale_edge.manifest import Manifest, ManifestError
from parscale_edge.kv_cache import KVCache
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.export import export_onnx
from golden import GOLDEN, run_cases
from tiny import massive_activation_model, tiny_model

#: ops of our graphs that ONNX Runtime 1.31's CUDA provider implements for tensor(bfloat16)
#: (docs/OperatorKernels.md; Constant is folded, not run). Neg, Tile, Where, Pow, Sqrt, ReduceMean have no
#: bfloat16 CUDA kernel.
CUDA_BF16_OPS = {"Add", "Cast", "Concat", "Constant", "Div", "Expand", "Gather", "Gemm", "Identity", "MatMul", "Mul",
                 "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Split", "Squeeze", "Sub", "Transpose",
                 "Unsqueeze"}


@pytest.fixture(scope="module")
def half_exports(tmp_path_factory):
    """{(golden name, precision): export folder} for fp32, fp16 and bf16 (fresh model per export:
    a half-precision export casts the model in place)."""
    root = tmp_path_factory.mktemp("half")
    out = {}
    for name in ("p1_dense", "p2_untied", "p4_tied"):
        for prec in ("fp32", "fp16", "bf16"):
            out[name, prec] = export_onnx(load_hf_folder(GOLDEN / name), root / f"{name}-{prec}", precision=prec)
    return out


def _types(folder) -> tuple[onnx.ModelProto, dict[str, int]]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(folder / "model.onnx"), load_external_data=False))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({i.name: i.data_type for i in g.initializer})
    return model, types


@pytest.mark.parametrize("name", ["p1_dense", "p2_untied", "p4_tied"])
def test_fp16_reproduces_golden_logits_and_fp32_top1(half_exports, name):
    fp16 = OnnxCausalLM(half_exports[name, "fp16"], device="cpu", threads=1)
    fp32 = OnnxCausalLM(half_exports[name, "fp32"], device="cpu", threads=1)
    man = fp16.manifest
    assert (man.precision, man.cache_dtype) == ("fp16", "float16")
    seen = {}

    def fwd(rt, tag):
        def f(ids, mask, pos, past):
            logits, present = rt.forward(ids, mask, pos, past if past is not None else KVCache.empty(rt.manifest, ids.shape[0]).tensors)
            seen.setdefault(tag, []).append(logits[mask[:, -ids.shape[1]:].astype(bool)])
            assert logits.dtype == np.float32 and present[0].dtype == np.dtype(rt.manifest.cache_dtype)
            return logits, present
        return f

    err16 = run_cases(GOLDEN / name, fwd(fp16, "fp16"))
    err32 = run_cases(GOLDEN / name, fwd(fp32, "fp32"))
    assert max(err32.values()) <= 1e-4
    a, b = np.concatenate(seen["fp32"]), np.concatenate(seen["fp16"])
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    assert len(a) >= 50 and agree >= 0.99, agree
    # fp16 weights and cache, fp32 norms/residual/softmax: logits of magnitude ~5 move by < 0.03
    assert 1e-4 < max(err16.values()) < 0.03, err16


@pytest.mark.parametrize("name", ["p2_untied", "p4_tied"])
def test_fp16_graph_keeps_norms_residual_softmax_and_aggregator_in_float32(half_exports, name):
    model, types = _types(half_exports[name, "fp16"])
    g = model.graph
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    ins = {i.name: i.type.tensor_type.elem_type for i in g.input}
    outs = {o.name: o.type.tensor_type.elem_type for o in g.output}
    assert outs["logits"] == F32 and ins["past_key_values.0.key"] == F16 and outs["present.1.value"] == F16
    checked = {"softmax": 0, "residual": 0, "norm": 0, "aggregate": 0}
    for n in g.node:
        data = [types[x] for x in [*n.input, *n.output] if x in types and types[x] in (F32, F16)]
        if n.op_type == "Softmax":
            checked["softmax"] += 1
            assert set(data) == {F32}, n.name
        elif re.fullmatch(r"/model/layers\.\d+/Add(_1)?", n.name):
            checked["residual"] += 1
            assert set(data) == {F32}, n.name
        elif re.search(r"(layernorm|/model/norm)/", n.name) and n.op_type in ("Pow", "ReduceMean", "Sqrt", "Div"):
            checked["norm"] += 1
            assert set(data) == {F32}, n.name
        elif "aggregate_layer" in n.name and n.op_type in ("MatMul", "Gemm", "Add", "Sigmoid"):
            checked["aggregate"] += 1
            assert set(data) == {F32}, n.name
    L = Manifest.read(half_exports[name, "fp16"]).num_layers
    assert checked["softmax"] >= L and checked["residual"] == 2 * L and checked["aggregate"] >= 2
    assert checked["norm"] >= 4 * (2 * L + 1)  # Pow, ReduceMean, Sqrt, Div of every RMSNorm
    weights = {i.name: i.data_type for i in g.initializer}
    q_proj = [n for n in g.node if n.name.endswith("q_proj/MatMul")]
    assert q_proj and all(weights[n.input[1]] == F16 for n in q_proj)  # the matmuls really are half


@pytest.mark.parametrize("name", ["p1_dense", "p4_tied"])
def test_bf16_graph_uses_only_ops_the_cuda_provider_runs_in_bfloat16(half_exports, name):
    folder = half_exports[name, "bf16"]
    man = Manifest.read(folder)
    assert (man.precision, man.cache_dtype) == ("bf16", "bfloat16")
    model, types = _types(folder)
    BF16 = TensorProto.BFLOAT16
    bf16_ops = {n.op_type for n in model.graph.node
                if any(types.get(x) == BF16 for x in n.output) or
                (n.op_type != "Cast" and any(types.get(x) == BF16 for x in n.input))}
    assert {"MatMul", "Concat"} <= bf16_ops and bf16_ops <= CUDA_BF16_OPS, bf16_ops - CUDA_BF16_OPS
    assert {o.name: o.type.tensor_type.elem_type for o in model.graph.output}["logits"] == TensorProto.FLOAT
    with pytest.raises(ManifestError, match="numpy cannot hold"):
        KVCache.empty(man, 1)


def test_fp16_export_of_a_bf16_model_with_massive_activations_has_no_nan_on_512_tokens(tmp_path):
    ids = np.random.default_rng(0).integers(0, 97, (1, 512))
    t = torch.from_numpy(ids)
    with torch.no_grad():
        naive = massive_activation_model().model.half()
        naive.residual_dtype = torch.float16  # everything in fp16, residual stream included
        naive_logits, _ = naive(t, torch.ones_like(t), torch.arange(512)[None])
    assert not torch.isfinite(naive_logits).all()  # the overflow this export must avoid is real

    fp32 = export_onnx(massive_activation_model(), tmp_path / "fp32")
    fp16 = export_onnx(massive_activation_model(), tmp_path / "fp16", precision="fp16")
    mask, pos = np.ones((1, 512), np.int64), np.arange(512)[None]
    out = {}
    for name, folder in (("fp32", fp32), ("fp16", fp16)):
        rt = OnnxCausalLM(folder, device="cpu", threads=1)
        logits, present = rt.forward(ids, mask, pos, KVCache.empty(rt.manifest, 1).tensors)
        nxt = logits[:, -1].argmax(-1)[:, None]
        step, present = rt.forward(nxt, np.ones((1, 513), np.int64), np.array([[512]]), present)
        assert np.isfinite(logits).all() and np.isfinite(step).all(), name
        assert all(np.isfinite(p.astype(np.float32)).all() for p in present), name
        out[name] = np.concatenate([logits[0], step[0]])
    a, b = out["fp32"], out["fp16"]
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.99


def test_pytorch_mixed_precision_model_matches_its_fp16_export(half_exports):
    lm = load_hf_folder(GOLDEN / "p2_untied")
    ref = lm.model.float().eval()
    ids = np.random.default_rng(1).integers(0, 300, (2, 9))
    t = torch.from_numpy(ids)
    args = (t, torch.ones_like(t), torch.arange(9)[None].repeat(2, 1))
    with torch.no_grad():
        want32, _ = ref(*args)
        half, cache = ref.to_mixed_precision(torch.float16)(*args)
    assert half.dtype == torch.float32 and cache[0].dtype == torch.float16
    assert ref.model.norm.weight.dtype == torch.float32 and ref.model.aggregate_layer[0].weight.dtype == torch.float32
    rt = OnnxCausalLM(half_exports["p2_untied", "fp16"], device="cpu", threads=1)
    got, _ = rt.forward(ids, np.ones_like(ids), np.arange(9)[None].repeat(2, 0), KVCache.empty(rt.manifest, 2).tensors)
    assert np.abs(got - half.numpy()).max() < 0.02 and np.abs(got - want32.numpy()).max() < 0.03
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        ref.to_mixed_precision(torch.float64)


def test_io_binding_stepper_matches_plain_runs_and_counts_half_cache_bytes(half_exports):
    for prec in ("fp32", "fp16"):
        rt = OnnxCausalLM(half_exports["p4_tied", prec], device="cpu", threads=1)
        plain, bound = KVCache.empty(rt.manifest, 2), KVCache.empty(rt.manifest, 2, ort_values=True)
        ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
        mask, pos = np.ones((2, 4), np.int64), np.arange(4)[None].repeat(2, 0)
        la, ca = rt.forward(ids, mask, pos, plain.tensors)
        lb, cb = rt.forward(ids, mask, pos, bound.tensors)
        nxt = la[:, -1].argmax(-1)[:, None]
        la2, ca = rt.forward(nxt, np.ones((2, 5), np.int64), np.full((2, 1), 4), ca)
        lb2, cb = rt.forward(nxt, np.ones((2, 5), np.int64), np.full((2, 1), 4), cb)
        plain.advance(ca)
        bound.advance(cb)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(la2, lb2)
        m = rt.manifest
        item = 2 if prec == "fp16" else 4
        expect = 2 * m.num_layers * m.parscale_n * 2 * m.num_key_value_heads * 5 * m.head_dim * item
        assert plain.nbytes == bound.nbytes == expect
        assert plain.on_host and not bound.on_host


def test_int4_from_an_fp16_export_keeps_fp16_activations_and_cache(half_exports, tmp_path):
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder

    src = half_exports["p2_untied", "fp16"]
    out = quantize_folder(src, tmp_path / "q4", QuantConfig(precision="int4", accuracy_level=0),
                          check_positions=0, compare_positions=64)
    man = Manifest.read(out)
    q = man.quantization
    assert (man.precision, man.cache_dtype, q["source_precision"]) == ("int4", "float16", "fp16")
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert len([n for n in g.node if n.op_type == "MatMulNBits"]) == 3 * 7 + 1
    # random weights: only shows that something was rounded and nothing broke (real bounds: GPU check)
    assert q["quality_vs_fp32"]["positions"] == 64 and 0 < q["quality_vs_fp32"]["kl_mean"] < 1.0


def test_unknown_export_precision_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown export precision 'fp8'; use fp32, fp16, bf16"):
        export_onnx(tiny_model(), tmp_path / "x", precision="fp8")
    assert not (tmp_path / "x").exists()


def test_cli_exports_fp16_compares_and_profiles_it_on_the_cpu(tmp_path, capsys):
    from parscale_edge.cli import EXPORT_PRECISIONS, FLOAT_PRECISIONS, main
    from parscale_edge.quant.onnx_quant import PRECISIONS
    from tiny_gguf import write_tiny_gguf

    assert EXPORT_PRECISIONS == FLOAT_PRECISIONS + PRECISIONS
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf, "qwen2")
    f32, f16 = tmp_path / "fp32", tmp_path / "fp16"
    assert main(["-q", "export", str(gguf), "-o", str(f32)]) == 0
    assert main(["-q", "export", str(gguf), "-o", str(f16), "--precision", "fp16"]) == 0
    assert "fp16" in capsys.readouterr().out and Manifest.read(f16).cache_dtype == "float16"
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    js = tmp_path / "cmp.json"
    assert main(["-q", "compare", str(f32), str(f16), "--text", str(text), "--max-positions", "64", "--device", "cpu",
                 "--json", str(js)]) == 0
    import json

    r = json.loads(js.read_text())
    assert r["candidate_precision"] == "fp16" and r["positions"] == 64 and r["top1_agreement"] >= 0.95
    prof = tmp_path / "prof"
    assert main(["-q", "--threads", "1", "profile", str(f16), "--device", "cpu", "--batch", "1", "--prompt-len", "4",
                 "--gen-len", "2", "--repeat", "1", "--warmup", "0", "-o", str(prof)]) == 0
    (row,) = json.loads((prof / "profile.json").read_text())["rows"]
    assert row["precision"] == "fp16" and row["cache_dtype"] == "float16" and row["provider"] == "CPUExecutionProvider"
    capsys.readouterr()
    assert main(["export", str(gguf), "-o", str(tmp_path / "x"), "--precision", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown precision 'fp8'; use one of fp32, fp16, bf16, int4") and "Traceback" not in err
