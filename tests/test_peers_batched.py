"""bench/peers/batched.py reads llama-batched-bench's JSONL into per-B step times (T_TG / TG) and
llama-bench's JSON into one sequence's step, and passes llama.cpp the cache type it compares."""
import json
import stat
from pathlib import Path

import pytest
from bench_script import load_bench

ROOT = Path(__file__).resolve().parents[1]


def fake_binary(tmp_path, records, rc=0):
    """A stand-in for llama-batched-bench that logs ``records`` as JSONL on stderr (where LOG writes)
    and its arguments to args.txt; returns its folder."""
    b = tmp_path / "llama-batched-bench"
    lines = "\n".join(json.dumps(r) for r in records)
    b.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args.txt\necho 'main: build info' >&2\n"
                 f"cat >&2 <<'EOF'\n{lines}\nEOF\nexit {rc}\n")
    b.chmod(b.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def test_step_time_is_generation_time_over_generated_tokens(tmp_path):
    batched = load_bench("peers/batched.py")
    recs = [{"pl": 1, "pp": 256, "tg": 128, "t_pp": 0.5, "t_tg": 1.28}, {"pl": 4, "pp": 256, "tg": 128, "t_pp": 2.0, "t_tg": 3.84}]
    got = batched.llama_steps(fake_binary(tmp_path, recs), tmp_path / "m.gguf", 1, [1, 4], 256, 128)
    assert got[1]["step_ms"] == pytest.approx(10.0) and got[4]["step_ms"] == pytest.approx(30.0)
    assert got[4]["prefill_ms"] == pytest.approx(2000.0) and got[4]["record"]["pl"] == 4


def test_a_missing_batch_or_a_failing_binary_is_an_error(tmp_path):
    batched = load_bench("peers/batched.py")
    b = fake_binary(tmp_path, [{"pl": 1, "pp": 256, "tg": 128, "t_pp": 0.5, "t_tg": 1.28}])
    with pytest.raises(RuntimeError, match=r"no result for B=\[8\]"):
        batched.llama_steps(b, tmp_path / "m.gguf", 1, [1, 8], 256, 128)
    with pytest.raises(RuntimeError, match="llama-batched-bench failed"):
        batched.llama_steps(fake_binary(tmp_path, [], rc=1), tmp_path / "m.gguf", 1, [1], 256, 128)


def test_quantized_cache_passes_q8_0_keys_and_values_with_flash_attention(tmp_path):
    batched = load_bench("peers/batched.py")
    recs = [{"pl": 1, "pp": 2048, "tg": 128, "t_pp": 4.0, "t_tg": 2.56}]
    batched.llama_steps(fake_binary(tmp_path, recs), tmp_path / "m.gguf", 2, [1], 2048, 128, kv_cache="int8")
    args = (tmp_path / "args.txt").read_text().split()
    assert args[args.index("-ctk") + 1] == "q8_0" and args[args.index("-ctv") + 1] == "q8_0"
    assert args[args.index("-fa") + 1] == "on" and args[args.index("-npp") + 1] == "2048"
    batched.llama_steps(fake_binary(tmp_path, recs), tmp_path / "m.gguf", 2, [1], 2048, 128)
    assert "-ctk" not in (tmp_path / "args.txt").read_text().split()


def test_llama_bench_step_is_the_inverse_of_its_tokens_per_second(tmp_path):
    batched = load_bench("peers/batched.py")
    b = tmp_path / "llama-bench"
    rec = [{"n_prompt": 0, "n_gen": 128, "n_depth": 2048, "avg_ts": 80.0, "type_k": "q8_0"}]
    b.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args.txt\ncat <<'EOF'\n{json.dumps(rec)}\nEOF\n")
    b.chmod(b.stat().st_mode | stat.S_IEXEC)
    got = batched.llama_bench_step(tmp_path, tmp_path / "m.gguf", 1, 2048, 128, kv_cache="int8")
    assert got["step_ms"] == pytest.approx(12.5) and got["record"]["n_depth"] == 2048
    args = (tmp_path / "args.txt").read_text().split()
    assert args[args.index("-d") + 1] == "2048" and args[args.index("-p") + 1] == "0"
    assert args[args.index("-ctk") + 1] == "q8_0"
    b.write_text("#!/bin/sh\necho 'error: bad model' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="llama-bench failed"):
        batched.llama_bench_step(tmp_path, tmp_path / "m.gguf", 1, 2048, 128)


def test_a_wrong_ours_folder_is_one_line_and_exit_2_before_any_build(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "bench" / "peers" / "batched.py"), "--ours", str(tmp_path / "nope")]
    r = subprocess.run(cmd, capture_output=True, text=True, env={"PARSCALE_EDGE_CACHE": str(tmp_path / "cache"),
                                                               "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.startswith("error: --ours:") and "Traceback" not in r.stderr
    assert not (tmp_path / "cache" / "peers").exists() or not any((tmp_path / "cache" / "peers").iterdir())
