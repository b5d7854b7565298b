"""bench/gpu_check.py (dry run on the CPU, carried wheels) and bench/paper_ratios.py."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import paper_ratios  # noqa: E402


def _wheel(path: Path, size: int, seed: int) -> Path:
    import random

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{path.name.split('-')[0]}/__init__.py", "")
        z.writestr("blob.bin", random.Random(seed).randbytes(size))
    return path


def test_split_for_carry_round_trips_and_refuses_missing_or_damaged_pieces(tmp_path):
    src = tmp_path / "wheels"
    src.mkdir()
    big = _wheel(src / "onnxruntime_gpu-1.0-cp311-cp311-manylinux_2_28_x86_64.whl", int(2.5 * 2**20), 0)
    small = [_wheel(src / f"pkg{i}-1.0-py3-none-any.whl", 300_000, i) for i in range(3)]
    folders = gpu_check.split_for_carry(src, 1)
    assert all(sum(f.stat().st_size for f in d.iterdir()) <= 2**20 for d in folders)
    pieces = sorted(f.name for d in folders for f in d.glob("*.part*"))
    assert pieces == [f"{big.name}.part{k:02d}" for k in range(3)]
    # carried in two separate folders, in any order
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i, d in enumerate(reversed(folders)):
        for f in d.iterdir():
            (f.rename((a if i % 2 else b) / f.name))
    got = gpu_check.collect_wheels([a, b], tmp_path / "joined")
    assert sorted(w.name for w in got) == sorted([big.name] + [s.name for s in small])
    assert next(w for w in got if w.name == big.name).read_bytes() == big.read_bytes()
    # one piece missing, then one damaged
    (b / f"{big.name}.part01").exists() and (b / f"{big.name}.part01").rename(tmp_path / "away")
    (a / f"{big.name}.part01").exists() and (a / f"{big.name}.part01").rename(tmp_path / "away")
    with pytest.raises(ValueError, match="2 of its 3 pieces are here; carry every carry-NN folder"):
        gpu_check.collect_wheels([a, b], tmp_path / "joined2")
    (tmp_path / "away").rename(a / f"{big.name}.part01")
    data = bytearray((a / f"{big.name}.part01").read_bytes())
    data[100] ^= 0xFF
    (a / f"{big.name}.part01").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs"):
        gpu_check.collect_wheels([a, b], tmp_path / "joined3")


def test_download_list_follows_pyproject_and_swaps_onnxruntime():
    reqs = gpu_check._requirements("onnxruntime-gpu==1.31.1", cuda_libs=False)
    assert reqs[0] == "onnxruntime-gpu==1.31.1"
    names = {r.split(">")[0].split("=")[0] for r in reqs}
    assert {"gguf", "tokenizers", "onnx", "onnx-ir", "safetensors", "scipy", "pytest"} <= names
    assert not {"torch", "onnxruntime"} & names
    assert gpu_check._requirements("onnxruntime-gpu==1.31.1", cuda_libs=True)[0] == "onnxruntime-gpu[cuda,cudnn]==1.31.1"


def test_install_without_wheels_is_one_clear_error(tmp_path, capsys):
    assert gpu_check.main(["install", "--wheels", str(tmp_path / "none"), "--target", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no wheel folder") and "--download --python-version" in err
    (tmp_path / "empty").mkdir()
    assert gpu_check.main(["install", "--wheels", str(tmp_path / "empty"), "--target", str(tmp_path / "site")]) == 2
    assert "no onnxruntime_gpu wheel" in capsys.readouterr().err


def test_dry_run_measures_every_model_and_writes_the_paper_ratios(tmp_path):
    """The whole check on the CPU with tiny models (P=1,2, fp16 and int4, batch 1 and 2)."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "run", "--dry-run", "-o", str(out),
                        "--work", str(tmp_path / "work"), "--skip-pytest", "--parallel", "1,2"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["skipped"] == [] and summary["total_seconds"] < summary["plan"]["deadline_s"]
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["ok"] and acc["device"] == "cpu" and any("bf16" in s for s in acc["skipped"])
    checks = {k: v["value"] for k, v in acc["checks"].items()}
    assert checks["reference fp16 on device: top-1 agreement with CPU fp32"] >= 0.99
    assert checks["fused fp16 on device: top-1 agreement with CPU fp32"] >= 0.99
    assert checks["fused int4 (from fp16) on device: top-1 agreement with the same int4 on CPU"] == 1.0  # same device
    assert checks["fused fp16: bf16-weighted Qwen2 with massive activations, 512 tokens, no NaN/Inf"] is True
    placed = acc["node_providers"]["fused-fp16"]
    assert placed["GroupQueryAttention"] == ["CPUExecutionProvider"] and "MatMulNBits" in acc["node_providers"]["fused-int4"]
    assert acc["golden"]["p4_tied"]["fp32"]["max_abs_vs_authors"] <= 1e-4
    assert 1e-4 < acc["golden"]["p4_tied"]["fused-fp16"]["max_abs_vs_authors"] < 0.03
    rows = json.loads((out / "profile.json").read_text())["rows"]
    assert {r["graph"] for r in rows} == {"fused"} and {r["cache_dtype"] for r in rows} == {"float16"}
    kinds = sorted({(r["kind"], r["P"], r["precision"]) for r in rows})
    assert kinds == [("dense", 2, "fp16"), ("dense", 2, "int4"), ("dense_anchor", 1, "fp16"), ("dense_anchor", 1, "int4"),
                     ("parscale", 1, "fp16"), ("parscale", 1, "int4"), ("parscale", 2, "fp16"), ("parscale", 2, "int4")]
    assert len(rows) == len(kinds) * 2 and all(r["decode_ms_p50"] > 0 and r["ttft_ms"] > 0 for r in rows)
    kv = {(r["kind"], r["P"], r["precision"], r["batch"]): r["kv_cache_mib"] for r in rows}
    # P streams: P x cache, each row with the prefix slots before the preallocated capacity (fused graph)
    cap, n_prefix = 16 + 8 + 1, gpu_check.ARCHS["tiny-0.5b"]["parscale_n_tokens"]  # prompt + gen_len + 1
    assert kv["parscale", 2, "fp16", 2] == pytest.approx(2 * kv["parscale", 1, "fp16", 2] * (n_prefix + cap) / cap)
    assert kv["parscale", 1, "fp16", 1] == pytest.approx(kv["parscale", 1, "int4", 1])  # int4: fp16 cache too
    ratios = json.loads((out / "paper_ratios.json").read_text())
    assert {r["method"] for r in ratios["rows"]} == {"twin", "interpolated"} and ratios["memory"] == "rss"
    assert (out / "paper_ratios.md").read_text().count("| twin |") == 4  # fp16/int4 x batch 1/2 at P=2
    assert (out / "profile_decode.png").stat().st_size > 1000


def _row(kind, P, latency, mem, N=None, batch=1, model="m"):
    return dict(kind=kind, P=P, model=model, family="qwen2", precision="fp16", batch=batch, prompt_len=64,
                latency_ms=latency, vram_before_mib=1000.0, vram_peak_mib=1000.0 + mem, rss_before_mib=0.0,
                peak_rss_mib=1.0, non_embedding_params=N)


def test_interpolated_dense_cost_between_p1_and_the_larger_anchor():
    from edge.scaling_law import PAPER

    law = PAPER["stack-v2-python"]
    N, Na = 100e6, 300e6
    rows = [_row("parscale", 1, 100.0, 500.0, N), _row("parscale", 8, 110.0, 520.0, N),
            _row("dense_anchor", 1, 300.0, 1500.0, Na, model="big")]
    res = paper_ratios.paper_ratios({"rows": rows})
    (r,) = res["rows"]
    frac = (law.equivalent_dense_params(N, 8) - N) / (Na - N)  # 1.818x N -> 0.409 of the way to the anchor
    assert res["memory"] == "vram" and r["method"] == "interpolated" and frac == pytest.approx(0.409, abs=1e-3)
    assert r["dense_memory_increase_mib"] == pytest.approx(1000.0 * frac)
    assert r["memory_ratio"] == pytest.approx(1000.0 * frac / 20.0)
    assert r["latency_ratio"] == pytest.approx(200.0 * frac / 10.0)
    assert (r["paper_memory_ratio"], r["paper_latency_ratio"]) == (22.0, 6.0)
    assert "| interpolated | fp16 | 1 | 8 | 20.0 / 409.1 (20.5x) | 10.0 / 81.8 (8.2x) | 22.0x / 6.0x |" in \
        paper_ratios.markdown(res)


def test_paper_ratios_cli_reports_a_missing_file(tmp_path, capsys):
    assert paper_ratios.main([str(tmp_path / "profile.json")]) == 2
    assert capsys.readouterr().err.startswith("error: no such file")


def _fake_nvidia_smi(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    f = bin_dir / "nvidia-smi"
    f.write_text("#!/bin/sh\n" + body + "\n")
    f.chmod(0o755)


def test_gpu_memory_and_description_come_from_nvidia_smi(tmp_path, monkeypatch):
    import edge.profile as prof
    from edge.device import gpu_description

    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML absent: nvidia-smi is asked
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    _fake_nvidia_smi(tmp_path / "bin", 'case "$1" in --query-gpu=memory.used) echo 1234;; '
                                       '*) echo "NVIDIA H200, 143771, 580.159.04, 9.0";; esac')
    assert prof.gpu_memory_used_mib() == 1234.0
    s = prof.PeakSampler(interval_s=0.001).start()
    assert s.stop() == 1234.0
    assert gpu_description() == [{"name": "NVIDIA H200", "memory_mib": 143771.0, "driver": "580.159.04",
                                  "compute_capability": "9.0"}]
    _fake_nvidia_smi(tmp_path / "bin", "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert prof.gpu_memory_used_mib() is None and gpu_description() is None
    assert prof.PeakSampler().start().stop() is None


def test_fused_graph_needs_onnxruntime_1_32(monkeypatch):
    """onnxruntime-gpu's newest release (1.31.1) cannot load the fused graph: the check says so and
    profiles the reference graph (run on ORT 1.31.1 by hand: FAIL with that line, reference rows)."""
    import onnxruntime as ort

    assert gpu_check.fused_graph_runs()[0] is True  # the CPU test environment has >= 1.32
    monkeypatch.setattr(ort, "__version__", "1.31.1")
    ok, why = gpu_check.fused_graph_runs()
    assert not ok and why == ("onnxruntime 1.31.1 cannot load the fused graph (GroupQueryAttention's query_seqlens "
                              "input needs >= 1.32)")
