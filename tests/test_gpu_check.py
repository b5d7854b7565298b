"""bench/gpu_check.sh (plan, parts, overlay), bench/gpu_check.py (dry run on the CPU), bench/cpu_threads.py
and bench/paper_ratios.py."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import cpu_threads  # noqa: E402
import gpu_check  # noqa: E402
import paper_ratios  # noqa: E402


SCRIPT = ROOT / "bench" / "gpu_check.sh"
MiB = 2**20


def _tree_bytes() -> int:
    """What travels with every device call: tracked files that exist, untracked ones git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file())


def test_the_plan_at_the_top_of_the_script_fits_the_device_limits():
    """Every call of the written plan: tree of now + its part <= 64 MiB; all calls <= 15 minutes
    with the machine's start; the last command <= 7 minutes."""
    text = SCRIPT.read_text()
    rows = [ln for ln in text.splitlines() if re.match(r"^# \| (\d+|total)", ln)]
    calls = [ln for ln in rows if not ln.startswith("# | total")]
    assert len(calls) >= 2 and calls[-1].count("--device") == 1
    tree = _tree_bytes() / MiB
    for ln in calls:
        carry = float(re.search(r"part-\d+ \(([\d.]+) MiB\)", ln).group(1))
        assert tree + carry <= 64 - 1, (ln, tree)  # 1 MiB of the 2 MiB margin may go to new files
    minutes = [float(m) for ln in calls for m in re.findall(r"([\d.]+) min", ln.split("|")[5])]
    total = float(re.search(r"([\d.]+) of 15", rows[-1]).group(1))
    assert total == pytest.approx(sum(minutes)) and total <= 15
    assert re.search(r"FINAL_S=(\d+)", text).group(1) == "420"


def _carry_env(tmp_path, limit_mib: int) -> dict:
    import os

    return dict(os.environ, CARRY=str(tmp_path / "carry"), SITE=str(tmp_path / "site"), LIMIT_MIB=str(limit_mib),
                PYTHON=sys.executable)


def _sh(env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_parts_fit_next_to_the_tree_and_assemble_into_an_overlay(tmp_path):
    """--resplit / --calls / --receive / --assemble on a small stand-in archive: a fake onnxruntime
    1.31.1 package (with CUDA listed) and 8 MiB of random bytes, cut into parts for a limit just
    above the tree; then a damaged part and a missing one are each one clear error."""
    import io
    import lzma
    import random
    import tarfile

    tree = _tree_bytes()
    limit = -(-tree // MiB) + 4  # MiB: 2-3 MiB per part next to the tree and the 2 MiB margin
    env = _carry_env(tmp_path, limit)
    build = tmp_path / "carry" / "build"
    build.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("onnxruntime/__init__.py", b"__version__ = '1.31.1'\n"
                                                       b"def get_available_providers():\n"
                                                       b"    return ['CUDAExecutionProvider', 'CPUExecutionProvider']\n"),
                           ("onnxruntime/capi/libonnxruntime_providers_cuda.so", random.Random(0).randbytes(8 * MiB))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (build / "ort-gpu-1.31.1-cp312.tar.xz").write_bytes(lzma.compress(buf.getvalue(), preset=0))
    r = _sh(env, "--resplit")
    assert r.returncode == 0, r.stderr
    calls = re.findall(r"call (\d+): run\(carry=\[\"(\S+)\"\], command=\"([^\"]+)\".*# ([\d.]+) MiB", r.stdout)
    assert len(calls) >= 3 and all(float(c[3]) <= limit for c in calls)
    assert calls[-1][2] == "bash bench/gpu_check.sh --device"
    assert calls[0][2] == "bash bench/gpu_check.sh --receive 1" and calls[0][1].endswith("carry/part-1")
    for k in range(1, len(calls)):
        r = _sh(env, "--receive", str(k))
        assert r.returncode == 0 and r.stdout.startswith(f"part {k} of {len(calls)} ok"), r.stderr
    r = _sh(env, "--assemble")
    assert r.returncode == 0, r.stderr
    assert "import ok: onnxruntime 1.31.1 from " + str(tmp_path / "site") in r.stdout
    assert (tmp_path / "site/onnxruntime/capi/libonnxruntime_providers_cuda.so").stat().st_size == 8 * MiB
    part2 = next((tmp_path / "carry" / "part-2").glob("*.tar.xz.*"))
    data = bytearray(part2.read_bytes())
    data[10] ^= 0xFF
    part2.write_bytes(bytes(data))
    r = _sh(env, "--receive", "2")
    assert r.returncode == 2 and "error: part 2 is damaged" in r.stderr
    (tmp_path / "carry" / "part-2").rename(tmp_path / "away")
    r = _sh(env, "--assemble")
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "error: missing: part-2 (the machine was given back between calls? start again at call 1)")


def test_an_onnxruntime_older_than_the_fused_graph_needs_is_one_line(monkeypatch):
    import onnxruntime as ort

    assert gpu_check.ort_too_old() is None  # the test environment's onnxruntime
    monkeypatch.setattr(ort, "__version__", "1.31.1")  # onnxruntime-gpu's newest: the fused graph runs there
    assert gpu_check.ort_too_old() is None
    monkeypatch.setattr(ort, "__version__", "1.30.0")  # the GPU machine's own (CPU) onnxruntime
    assert gpu_check.ort_too_old() == ("onnxruntime 1.30.0 is older than 1.31, which the fused graph needs (on the "
                                       "GPU machine: bench/gpu_check.sh carries onnxruntime-gpu 1.31.1)")


def test_a_step_past_the_deadline_is_stopped_and_recorded():
    r = gpu_check._bounded([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(30)"], 0.0,
                           floor_s=1.0)
    assert r.returncode == 124 and r.stdout == "started\n" and r.stderr.endswith("stopped after 1 s (deadline)")


def test_cpu_thread_table_orders_and_ratios():
    assert cpu_threads.order((1, 2, 4, 8), (1, 2))[:4] == [(1, 1), (4, 1), (1, 2), (4, 2)]
    rows = [{"P": P, "threads": t, "decode_ms_p50": ms} for P, t, ms in
            [(1, 1, 10.0), (4, 1, 30.0), (1, 2, 6.0), (4, 2, 12.0), (2, 2, 8.0)]]
    res = {"rows": rows, "skipped": ["P=8 threads=2: deadline"], "prompt_len": 32, "gen_len": 32,
           "ratios": cpu_threads.ratios(rows)}
    assert res["ratios"] == {"1": 3.0, "2": 2.0}
    md = cpu_threads.markdown(res, "t")
    assert "| 1 | 10.00 | - | 30.00 | 3.00x |" in md and "| 2 | 6.00 | 8.00 | 12.00 | 2.00x |" in md
    assert "- skipped: P=8 threads=2: deadline" in md


def test_dry_run_measures_every_model_and_writes_the_paper_ratios(tmp_path):
    """The whole check on the CPU with tiny models (P=1,2, fp16 and int4, batch 1 and 2; the CPU
    thread step at 1 thread)."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "run", "--dry-run", "-o", str(out),
                        "--work", str(tmp_path / "work"), "--skip-pytest", "--parallel", "1,2", "--cpu-threads", "1"],
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
    assert checks["fused fp16 with the int8 KV cache on device: top-1 agreement with the same on CPU"] == 1.0
    assert acc["node_providers"]["fused-kv8"]["GroupQueryAttention"] == ["CPUExecutionProvider"]
    # the int8 cache rounds keys and values: near the fp16 cache's logits, not equal to them
    kv8 = acc["golden"]["p4_tied"]["fused-kv8"]
    assert kv8["top1_vs_cpu_fp32"] >= 0.9 and kv8["max_abs_vs_cpu_fp32"] > acc["golden"]["p4_tied"]["fused-fp16"]["max_abs_vs_cpu_fp32"]
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
    threads = json.loads((out / "cpu_threads.json").read_text())
    assert threads["arch"] == "tiny-smollm2" and threads["skipped"] == []
    assert sorted((r["P"], r["threads"]) for r in threads["rows"]) == [(1, 1), (2, 1)]
    assert all(r["decode_ms_p50"] > 0 and r["precision"] == "int4" for r in threads["rows"])
    assert "| 1 | " in (out / "cpu_threads.md").read_text()


def _row(kind, P, latency, mem, N=None, batch=1, model="m"):
    return dict(kind=kind, P=P, model=model, family="qwen2", precision="fp16", batch=batch, prompt_len=64,
                latency_ms=latency, vram_before_mib=1000.0, vram_peak_mib=1000.0 + mem, rss_before_mib=0.0,
                peak_rss_mib=1.0, non_embedding_params=N)


def test_interpolated_dense_cost_between_p1_and_the_larger_anchor():
    from parscale_edge.scaling_law import PAPER

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
    import parscale_edge.profile as prof
    from parscale_edge.device import gpu_description

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
