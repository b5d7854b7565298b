"""bench/op_profile.py attributes kernel time to decode steps only, per operator type."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("op_profile", ROOT / "bench" / "op_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def node(op, ts, dur):
    return {"cat": "Node", "name": f"/n/{op}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_the_prompt_is_dropped_and_kernels_are_summed_per_step(tmp_path):
    ev = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 5000},  # the prompt: > 3x the median
          node("MatMulNBits", 10, 4000)]
    for k in range(4):  # four decode steps of 1000 us: 600 MatMulNBits + 2 x 100 Gemm
        t0 = 10_000 + 2000 * k
        ev += [{"cat": "Session", "name": "model_run", "ts": t0, "dur": 1000},
               node("MatMulNBits", t0 + 10, 600), node("Gemm", t0 + 700, 100), node("Gemm", t0 + 850, 100)]
    ev.append(node("Gemm", 30_000, 999))  # outside every run: ignored
    f = tmp_path / "p.json"
    f.write_text(json.dumps(ev))
    got = load().aggregate(f)
    assert got["steps"] == 4 and got["run_us_median"] == 1000
    assert got["kernel_us"] == 800.0 and got["nodes"] == 3.0 and got["outside_kernels_us"] == 200.0
    assert got["ops"]["MatMulNBits"] == {"us": 600.0, "nodes": 1.0, "share": 0.75}
    assert got["ops"]["Gemm"] == {"us": 200.0, "nodes": 2.0, "share": 0.25}
    assert list(got["ops"]) == ["MatMulNBits", "Gemm"]


def test_a_profile_without_runs_is_an_error(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([node("Gemm", 0, 5)]))
    with pytest.raises(ValueError, match="no model_run"):
        load().aggregate(f)
