"""bench/op_profile.py attributes kernel time to decode steps only, per operator type."""
import json
from pathlib import Path

import pytest
from bench_script import load_bench

ROOT = Path(__file__).resolve().parents[1]


def node(op, ts, dur):
    return {"cat": "Node", "name": f"/n/{op}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_the_prompt_is_dropped_and_kernels_are_summed_per_step(tmp_path):
    ev = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 5000},  # the prompt
          node("MatMulNBits", 10, 4000)]
    for k in range(4):  # four decode steps of 1000 us: 600 MatMulNBits + 2 x 100 Gemm
        t0 = 10_000 + 2000 * k
        ev += [{"cat": "Session", "name": "model_run", "ts": t0, "dur": 1000},
               node("MatMulNBits", t0 + 10, 600), node("Gemm", t0 + 700, 100), node("Gemm", t0 + 850, 100)]
    ev.append(node("Gemm", 30_000, 999))  # outside every run: ignored
    f = tmp_path / "p.json"
    f.write_text(json.dumps(ev))
    got = load_bench("op_profile.py").aggregate(f)
    assert got["steps"] == 4 and got["run_us"] == 1000
    assert got["kernel_us"] == 800.0 and got["nodes"] == 3.0 and got["outside_kernels_us"] == 200.0
    assert got["ops"]["MatMulNBits"] == {"us": 600.0, "nodes": 1.0, "share": 0.75}
    assert got["ops"]["Gemm"] == {"us": 200.0, "nodes": 2.0, "share": 0.25}
    assert list(got["ops"]) == ["MatMulNBits", "Gemm"]


def test_a_short_prompt_is_dropped_by_position_not_by_length(tmp_path):
    """A 16-token prompt runs about as long as a step: it is still the first run, never a step."""
    ev = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 1500}, node("MatMulNBits", 10, 1400),
          {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 1000}, node("MatMulNBits", 2010, 900),
          {"cat": "Session", "name": "model_run", "ts": 4000, "dur": 1200}, node("MatMulNBits", 4010, 1000)]
    f = tmp_path / "p.json"
    f.write_text(json.dumps(ev))
    got = load_bench("op_profile.py").aggregate(f)
    assert got["steps"] == 2 and got["run_us"] == 1100.0 and got["kernel_us"] == 950.0
    assert got["outside_kernels_us"] == 150.0


def test_a_profile_without_a_decode_step_is_an_error(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"cat": "Session", "name": "model_run", "ts": 0, "dur": 9}, node("Gemm", 0, 5)]))
    with pytest.raises(ValueError, match="1 model_run events, no decode step"):
        load_bench("op_profile.py").aggregate(f)


def test_a_folder_that_is_no_export_or_lacks_the_p_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "bench" / "op_profile.py"), "--ours", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --ours:") and "Traceback" not in r.stderr
