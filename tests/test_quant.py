"""Quantization of exported folders (ORT MatMulNBits), GGUF block reuse, and the quality tools."""
import math

import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import tiny_gguf
from parscale_edge.evaluate import compare, perplexity
from parscale_edge.manifest import ManifestError, Manifest
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.quant.gguf_blocks import dequantize_repacked, repack
from parscale_edge.quant.onnx_quant import (QuantConfig, QuantizationError, level0_warning, quantize_folder,
                                            report_lines)


def _ops(folder):
    g = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return g


def _q(src, out, **kw):
    check = kw.pop("check_positions", 0)
    return quantize_folder(src, out, QuantConfig(**kw), check_positions=check, compare_positions=64)


def test_int4_quantizes_backbone_and_head_but_not_the_aggregator(golden_exports, tmp_path):
    _, rt = golden_exports["p2_untied"]
    out = _q(rt.folder, tmp_path / "q4", precision="int4", block_size=32, accuracy_level=0)
    g = _ops(out)
    nbits = [n for n in g.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3 * 7 + 1  # q,k,v,o,gate,up,down per layer + lm_head
    agg = [n for n in g.node if "aggregate_layer" in n.name and n.op_type == "MatMul"]
    assert len(agg) == 2  # stays float
    man = Manifest.read(out)
    assert man.precision == "int4" and man.quantization["block_size"] == 32
    q = man.quantization["quality_vs_fp32"]
    # random weights: the values only show that something was rounded (real-model bounds: slow tests)
    assert q["positions"] == 64 and 0 < q["kl_mean"] < 1.0
    ids = np.array([[3, 4, 5, 6]])
    a, _ = rt.forward(ids, np.ones((1, 4), np.int64), np.arange(4)[None])
    b, _ = OnnxCausalLM(out, device="cpu").forward(ids, np.ones((1, 4), np.int64), np.arange(4)[None])
    assert b.shape == a.shape and np.isfinite(b).all() and 0 < np.abs(a - b).max() < 5


def test_int8_is_closer_than_int4(golden_exports, tmp_path):
    _, rt = golden_exports["p4_tied"]
    q8 = Manifest.read(_q(rt.folder, tmp_path / "q8", precision="int8", accuracy_level=0)).quantization
    q4 = Manifest.read(_q(rt.folder, tmp_path / "q4", precision="int4", accuracy_level=0)).quantization
    assert q8["quality_vs_fp32"]["kl_mean"] < q4["quality_vs_fp32"]["kl_mean"] / 4
    assert q8["quality_vs_fp32"]["top1_agreement"] >= 0.95
    assert q8["lm_head_untied"] and q4["lm_head_untied"]  # tied head got its own quantized MatMul


def test_keep_lm_head_leaves_the_tied_gemm(golden_exports, tmp_path):
    _, rt = golden_exports["p4_tied"]
    g = _ops(_q(rt.folder, tmp_path / "q", precision="int4", quantize_lm_head=False))
    assert [n.op_type for n in g.node if n.op_type == "Gemm"] == ["Gemm"]
    assert len([n for n in g.node if n.op_type == "MatMulNBits"]) == 2 * 7


@pytest.mark.parametrize("kw,msg", [
    (dict(precision="int3"), "unknown precision 'int3'"),
    (dict(block_size=48), "power of two"),
    (dict(block_size=128), "does not divide the input dimension"),
    (dict(accuracy_level=7), "accuracy_level must be 0..4"),
    (dict(precision="int8", algorithm="hqq"), "4-bit only"),
])
def test_bad_settings_are_refused_and_leave_nothing(golden_exports, tmp_path, kw, msg):
    _, rt = golden_exports["p2_untied"]  # hidden 64: block 128 does not divide it
    with pytest.raises(QuantizationError, match=msg):
        _q(rt.folder, tmp_path / "out", **kw)
    assert list(tmp_path.iterdir()) == []


def test_already_quantized_and_non_export_inputs(golden_exports, tmp_path):
    _, rt = golden_exports["p1_dense"]
    q = _q(rt.folder, tmp_path / "q", precision="int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        _q(q, tmp_path / "qq")
    with pytest.raises(ManifestError, match="not a parscale-edge export folder"):
        _q(tmp_path, tmp_path / "x")


def test_dynamic_int8_warns(golden_exports, tmp_path):
    import onnxruntime as ort

    from parscale_edge.runtime import ort_version
    from parscale_edge.quant.onnx_quant import INT8_DYNAMIC_MIN_ORT

    _, rt = golden_exports["p1_dense"]
    if ort_version(ort.__version__) < INT8_DYNAMIC_MIN_ORT:  # .ci/ort_compat.sh (onnxruntime 1.31)
        with pytest.raises(QuantizationError, match=r"int8-dynamic needs onnxruntime >= 1.32: .* use --precision int8"):
            _q(rt.folder, tmp_path / "d", precision="int8-dynamic")
        assert not (tmp_path / "d").exists()
        return
    with pytest.warns(UserWarning, match="fragile"):
        out = _q(rt.folder, tmp_path / "d", precision="int8-dynamic")
    assert any(n.op_type == "MatMulInteger" for n in _ops(out).node)


def test_dynamic_int8_on_onnxruntime_1_31_is_refused_before_any_work(golden_exports, tmp_path, monkeypatch):
    import onnxruntime as ort

    _, rt = golden_exports["p1_dense"]
    monkeypatch.setattr(ort, "__version__", "1.31.1")
    with pytest.raises(QuantizationError, match=r"quantize_dynamic of onnxruntime 1.31.1 writes a graph"):
        _q(rt.folder, tmp_path / "d", precision="int8-dynamic")
    assert not (tmp_path / "d").exists()


def test_accuracy_level_check_records_its_choice(golden_exports, tmp_path):
    _, rt = golden_exports["p2_untied"]
    out = _q(rt.folder, tmp_path / "q", precision="int4", accuracy_level=4, check_positions=64)
    c = Manifest.read(out).quantization["accuracy_check"]
    assert c["chosen"] in ("all level 4", "down_proj 4-bit nodes level 0", "MLP 4-bit nodes level 0",
                           "all 4-bit nodes level 0", "all level 0")
    assert c["agreement"] >= 0.95 and 0 <= c["agreement_level4_vs_level0"] <= 1 and c["ppl_increase"] <= 0.005
    levels = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0) for n in _ops(out).node
              if n.op_type == "MatMulNBits"}
    assert levels == ({4} if c["chosen"] == "all level 4" else {0, 4} if c["chosen"] != "all level 0" else {0})
    assert not list(out.glob("check_*.onnx"))


# ------------------------------------------------------------------------------- GGUF block reuse
def _random_k_blocks(qt, rows, rng):
    """Random but valid K-quant super-blocks (gguf-py cannot quantize K-quants): random bytes with
    finite fp16 scales."""
    nbytes = {"Q4_K": 144, "Q6_K": 210}[qt]
    raw = rng.integers(0, 256, (rows, 2, nbytes), dtype=np.uint8)
    scale = np.float16(0.01).tobytes()
    fields = [0, 2] if qt == "Q4_K" else [208]
    for f in fields:
        raw[..., f:f + 2] = np.frombuffer(scale, np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qt", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"])
def test_repacked_blocks_dequantize_exactly_like_ggml(qt):
    rng = np.random.default_rng(0)
    if qt.endswith("_K"):
        raw = _random_k_blocks(qt, 6, rng)
    else:
        raw = quantize(rng.standard_normal((6, 512)).astype(np.float32), Q[qt])
    rw = repack(raw, qt)
    ref = dequantize(raw, Q[qt]).reshape(6, -1)
    assert ref.shape == (6, 512) and np.abs(ref).max() > 0
    np.testing.assert_allclose(dequantize_repacked(rw), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def _gguf_export(tmp_path, monkeypatch, types):
    from parscale_edge.cli import main

    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    quant = {f"{n}.weight": Q[t] for n, t in zip(names, types[1:])}
    quant["model.embed_tokens.weight"] = Q[types[0]]
    monkeypatch.setattr(tiny_gguf, "QUANT", quant)
    tiny_gguf.write_tiny_gguf(tmp_path / "t.gguf", "llama")
    assert main(["-q", "export", str(tmp_path / "t.gguf"), "-o", str(tmp_path / "fp32")]) == 0
    return tmp_path / "fp32"


def _bits(folder):
    return sorted(next(a.i for a in n.attribute if a.name == "bits") for n in _ops(folder).node
                  if n.op_type == "MatMulNBits")


@pytest.mark.parametrize("precision,types", [
    ("int4", ["Q8_0", "Q4_1", "Q4_0", "Q4_1", "Q4_1", "Q4_1", "Q4_0", "Q4_1"]),  # 4-bit layers, 8-bit tied head
    ("int8", ["Q5_0", "Q8_0", "Q5_0", "Q8_0", "Q5_0", "Q8_0", "Q5_0", "Q8_0"]),
    ("int4", ["Q8_0", "Q4_1", "Q4_1", "Q4_1", "Q4_0", "Q4_1", "Q4_1", "Q4_0"]),  # packed q/k/v and gate/up
])
def test_gguf_source_is_reused_losslessly(tmp_path, monkeypatch, precision, types):
    """A GGUF export quantized at level 0 reproduces the fp32 export of the dequantized weights:
    the GGUF's blocks are copied, not re-rounded (Q4_1 through the exact residual correction)."""
    fp32 = _gguf_export(tmp_path, monkeypatch, types)
    out = quantize_folder(fp32, tmp_path / "q", QuantConfig(precision=precision, accuracy_level=0),
                          check_positions=0, compare_positions=128)
    q = Manifest.read(out).quantization
    # mixed types inside q/k/v or gate/up: the packed nodes are split back (7 per layer); one type
    # per pack: qkv, o, gate_up, down (4 per layer); + the tied head
    per_layer = 7 if len(set(types[1:4])) > 1 or len(set(types[5:7])) > 1 else 4
    assert Manifest.read(fp32).graph == "fused"
    assert q["gguf_repacked_nodes"] == 2 * per_layer + 1
    assert q["quality_vs_fp32"]["kl_max"] < 1e-6 and q["quality_vs_fp32"]["top1_agreement"] == 1.0
    bits = 8 if precision == "int8" else 4
    assert _bits(out) == sorted([bits] * 2 * per_layer + [8])
    # Q4_1 corrections: one block-sum MatMul per corrected input (no Reshape/ReduceSum) and one Gemm
    # per corrected weight (the fused graph's MatMuls read 2-D token rows; no separate Add)
    nodes = _ops(out).node
    sums = [n for n in nodes if "gguf_blocksum" in n.name]
    corrections = [n for n in nodes if n.name.endswith("_gguf_correction") and n not in sums]
    assert {n.op_type for n in sums} <= {"MatMul"} and len({n.input[0] for n in sums}) == len(sums)
    assert {n.op_type for n in corrections} <= {"Gemm"} and not [n for n in nodes if "gguf_add" in n.name]
    assert (len(corrections) > 0) == ("Q4_1" in types[1:]) and len(sums) <= len(corrections)
    # with reuse switched off the same weights are re-rounded: measurably different
    off = quantize_folder(fp32, tmp_path / "off", QuantConfig(precision=precision, accuracy_level=0, gguf_blocks=False),
                          check_positions=0, compare_positions=128)
    assert Manifest.read(off).quantization["quality_vs_fp32"]["kl_mean"] > 1e-7


def test_int4_keeps_sensitive_8_bit_tensors_and_re_rounds_q5_0(tmp_path, monkeypatch):
    fp32 = _gguf_export(tmp_path, monkeypatch, ["Q8_0", "Q4_1", "Q8_0", "Q4_1", "Q4_1", "Q4_1", "Q5_0", "Q4_1"])
    out = quantize_folder(fp32, tmp_path / "q", QuantConfig(precision="int4"), check_positions=0, compare_positions=0)
    assert Manifest.read(out).quantization["gguf_repacked_nodes"] == 2 * 6 + 1
    assert _bits(out) == [4] * 12 + [8] * 3  # k_proj (Q8_0) stays 8-bit, up_proj (Q5_0) became 4-bit


# ------------------------------------------------------------------------------------ quality tools
def test_perplexity_of_uniform_model_is_vocab_size():
    V = 37
    r = perplexity(lambda ids: np.zeros(ids.shape + (V,), np.float32), list(range(30)) * 10, window=64)
    assert r["perplexity"] == pytest.approx(V) and r["positions"] == 299


def test_sliding_window_scores_every_position_once_with_context():
    seen = []

    def fn(ids):
        seen.append(ids.shape[1])
        return np.zeros(ids.shape + (5,), np.float32)

    r = perplexity(fn, [i % 5 for i in range(1000)], window=100, stride=50, max_positions=400)
    assert r["positions"] == 400 and seen[0] == 100 and all(s <= 100 for s in seen)


def test_compare_identical_and_shifted_models():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 50)).astype(np.float32)
    ref = lambda ids: table[ids]  # noqa: E731
    tokens = rng.integers(0, 50, 600).tolist()
    same = compare(ref, ref, tokens, window=128)
    assert same["kl_mean"] == 0 and same["top1_agreement"] == 1.0 and same["positions"] == 599
    flat = compare(ref, lambda ids: table[ids] * 0.0, tokens, window=128)
    assert flat["cand_perplexity"] == pytest.approx(50, rel=1e-6) and flat["kl_mean"] > 0.1
    assert math.isclose(flat["ref_perplexity"], same["ref_perplexity"])


def test_hqq_algorithm_runs_and_is_recorded(golden_exports, tmp_path):
    _, rt = golden_exports["p2_untied"]
    out = _q(rt.folder, tmp_path / "hqq", precision="int4", algorithm="hqq", accuracy_level=0)
    man = Manifest.read(out)
    assert man.quantization["algorithm"] == "hqq"
    assert len([n for n in _ops(out).node if n.op_type == "MatMulNBits"]) == 3 * 7 + 1
    assert 0 < man.quantization["quality_vs_fp32"]["kl_mean"] < 1.0


def test_gptq_without_calibration_text_is_refused(golden_exports, tmp_path):
    _, rt = golden_exports["p2_untied"]
    with pytest.raises(QuantizationError, match="GPTQ needs calibration text"):
        _q(rt.folder, tmp_path / "g", precision="int4", algorithm="gptq")
    assert list(tmp_path.iterdir()) == []


def test_quantize_needs_no_torch(golden_exports, tmp_path):
    """The quant path (no GGUF source here) imports neither torch nor parscale_edge.loading."""
    import subprocess
    import sys

    _, rt = golden_exports["p1_dense"]
    code = ("import sys; sys.modules['torch'] = None\n"
            "from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder\n"
            f"quantize_folder({str(rt.folder)!r}, {str(tmp_path / 'q')!r}, QuantConfig(precision='int4'),"
            " check_positions=16, compare_positions=16)\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                       env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_report_lines_of_the_manifest_record():
    q = {"quantized_nodes": 5, "gguf_repacked_nodes": 3, "size_mib": 50.0, "source_size_mib": 200.0,
         "accuracy_check": {"agreement_level4_vs_level0": 0.9, "ppl_increase_level4_vs_level0": 0.02, "positions": 64,
                            "chosen": "all level 0", "agreement": 1.0, "ppl_increase": 0.0},
         "quality_vs_fp32": {"positions": 32, "ref_perplexity": 10.0, "cand_perplexity": 10.5, "kl_mean": 0.01,
                             "kl_p99": 0.1, "top1_agreement": 0.95}}
    cfg = QuantConfig(precision="int8", block_size=64)
    assert report_lines(q, cfg, "out", "fp32", 1.3) == [
        "int8 (asym, block 64, rtn) -> out: 50.0 MiB (fp32 200.0 MiB, 25%) in 1.3 s",
        "  3 weights reuse the GGUF's own quantized blocks (no re-rounding); 2 re-rounded (asym, block 64, rtn)",
        "  accuracy_level 4 vs 0: top-1 agreement 90.00%, perplexity +2.00% over 64 positions; chosen: all level 0 "
        "(100.00%, +0.00%)",
        "  quality cost vs fp32 (32 positions): perplexity 10.000 -> 10.500 (+5.00%), KL mean 0.0100 p99 0.1000, "
        "top-1 agreement 95.00%"]
    assert "--check-positions 0 (keeps level 4, top-1 agreement 90.0%)" in level0_warning(q)
    plain = {"quantized_nodes": 4, "size_mib": 50.0, "source_size_mib": 100.0}
    assert report_lines(plain, cfg, "out", "fp16", 2.0) == ["int8 (asym, block 64, rtn) -> out: 50.0 MiB (fp16 100.0 MiB, "
                                                            "50%) in 2.0 s"]
    assert level0_warning(plain) is None
