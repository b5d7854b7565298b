"""bench/peers/batched.py reads llama-batched-bench's JSONL into per-B step times (T_TG / TG)."""
import importlib.util
import json
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("batched", ROOT / "bench" / "peers" / "batched.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_binary(tmp_path, records, rc=0):
    """A stand-in for llama-batched-bench that logs ``records`` as JSONL on stderr (where LOG writes)."""
    b = tmp_path / "llama-batched-bench"
    lines = "\n".join(json.dumps(r) for r in records)
    b.write_text(f"#!/bin/sh\necho 'main: build info' >&2\ncat >&2 <<'EOF'\n{lines}\nEOF\nexit {rc}\n")
    b.chmod(b.stat().st_mode | stat.S_IEXEC)
    return b


def test_step_time_is_generation_time_over_generated_tokens(tmp_path):
    batched = load()
    recs = [{"pl": 1, "pp": 256, "tg": 128, "t_pp": 0.5, "t_tg": 1.28}, {"pl": 4, "pp": 256, "tg": 128, "t_pp": 2.0, "t_tg": 3.84}]
    got = batched.llama_steps(fake_binary(tmp_path, recs), tmp_path / "m.gguf", 1, [1, 4], 256, 128)
    assert got[1]["step_ms"] == pytest.approx(10.0) and got[4]["step_ms"] == pytest.approx(30.0)
    assert got[4]["prefill_ms"] == pytest.approx(2000.0) and got[4]["record"]["pl"] == 4


def test_a_missing_batch_or_a_failing_binary_is_an_error(tmp_path):
    batched = load()
    b = fake_binary(tmp_path, [{"pl": 1, "pp": 256, "tg": 128, "t_pp": 0.5, "t_tg": 1.28}])
    with pytest.raises(RuntimeError, match=r"no result for B=\[8\]"):
        batched.llama_steps(b, tmp_path / "m.gguf", 1, [1, 8], 256, 128)
    with pytest.raises(RuntimeError, match="llama-batched-bench failed"):
        batched.llama_steps(fake_binary(tmp_path, [], rc=1), tmp_path / "m.gguf", 1, [1], 256, 128)
