"""Row 13, interrupted work: killing export, quantize or fetch (SIGKILL, at chosen calls and at
random times) leaves either the old output or none, never a half folder that later loads, and the
next run removes the killed run's leftovers; two exports to one folder at once end with one
complete folder (edge/atomic.py: build aside, rename under a lock). Training is another issue's."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from parscale_edge.manifest import Manifest
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.export import export_onnx
from robustness.interrupt_child import FAKE_PARTS, fake_payload
from tiny import tiny_model

CHILD = Path(__file__).with_name("interrupt_child.py")
IDS = np.array([[4, 8, 15, 16, 23]])


def run_child(spec: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(CHILD), json.dumps(spec, default=str)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def start_child(spec: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(CHILD), json.dumps(spec, default=str)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def refs():
    """Reference logits of the child's export job for seeds 1 and 2 (PyTorch)."""
    out = {}
    for seed in (1, 2):
        m = tiny_model("qwen2", 2, seed=seed).model
        t = torch.from_numpy(IDS)
        with torch.no_grad():
            out[f"seed{seed}"] = m(t, torch.ones_like(t), torch.arange(5)[None])[0].numpy()
    return out


def state(out: Path, refs: dict) -> str:
    """'none', or the source whose logits the folder reproduces; fails on a folder that exists but
    does not load and match (a half-written folder)."""
    if not out.exists():
        return "none"
    man = Manifest.read(out)
    got, _ = OnnxCausalLM(out, "cpu", 1).forward(IDS, np.ones((1, 5), np.int64), np.arange(5)[None])
    np.testing.assert_allclose(got, refs[man.source], atol=1e-4)  # manifest and weights are one export
    return man.source


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture
def old_export(tmp_path):
    lm = tiny_model("qwen2", 2, seed=1)
    lm.source = "seed1"
    return export_onnx(lm, tmp_path / "out")


# kill point -> what the destination must hold afterwards
EXPORT_KILLS = [(("onnx", "save_model", 1), "seed1"),  # writing the new graph (in the temporary folder)
                (("os", "replace", 1), "seed1"),        # about to move the old folder aside
                (("os", "replace", 2), "none"),         # old folder aside, new one not yet in place
                (("shutil", "rmtree", 2), "seed2")]     # new folder in place, deleting the old one


@pytest.mark.parametrize("kill,expect", EXPORT_KILLS, ids=[f"{k[0]}.{k[1]}#{k[2]}" for k, _ in EXPORT_KILLS])
def test_export_killed_leaves_old_output_or_none(old_export, refs, kill, expect):
    out = old_export
    r = run_child({"job": "export", "out": out, "seed": 2, "kill": kill})
    assert r.returncode == -signal.SIGKILL, f"the kill point was never reached: {r.returncode} {r.stderr[-500:]}"
    assert state(out, refs) == expect
    assert leftovers(out)  # the killed run left its temporary folder behind...
    lm = tiny_model("qwen2", 2, seed=2)
    lm.source = "seed2"
    export_onnx(lm, out, overwrite=True)
    assert state(out, refs) == "seed2" and leftovers(out) == []  # ...and the next run removed it


@pytest.mark.parametrize("delay", [0.5, 2.5])
def test_export_killed_at_a_random_time(old_export, refs, delay):
    out = old_export
    p = start_child({"job": "export", "out": out, "seed": 2})
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert state(out, refs) in ("seed1", "seed2", "none")


@pytest.mark.parametrize("overwrite", [True, False])
def test_two_exports_to_one_folder_at_once(tmp_path, refs, overwrite):
    out = tmp_path / "work" / "out"
    (tmp_path / "barrier").mkdir()
    procs = [start_child({"job": "export", "out": out, "seed": s, "overwrite": overwrite, "barrier": [tmp_path / "barrier", 2],
                          "delay": ["os", "replace", 0.4]}) for s in (1, 2)]  # slow renames widen the race
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    codes = [rc for _, _, rc in results]
    winner = state(out, refs)
    assert winner in ("seed1", "seed2") and leftovers(out) == []
    if overwrite:
        assert codes == [0, 0], [e[-800:] for _, e, _ in results]
    else:  # exactly one wins; the other is told, and its temporary folder is gone
        assert sorted(codes) == [0, 1]
        loser = results[codes.index(1)][1]
        assert "FileExistsError" in loser and ("was created by another process" in loser or "exists" in loser)


@pytest.fixture(scope="module")
def fp32_src(tmp_path_factory):
    lm = tiny_model("qwen2", 2, seed=1)
    lm.source = "seed1"
    return export_onnx(lm, tmp_path_factory.mktemp("q") / "fp32")


@pytest.mark.parametrize("kill,expect", [(("onnx", "save_model", 1), "int8"), (("os", "replace", 1), "int8"),
                                         (("os", "replace", 2), "none")], ids=["save", "replace#1", "replace#2"])
def test_quantize_killed_leaves_old_output_or_none(fp32_src, tmp_path, refs, kill, expect):
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder

    out = quantize_folder(fp32_src, tmp_path / "q", QuantConfig(precision="int8", block_size=16),
                          check_positions=0, compare_positions=0)
    r = run_child({"job": "quantize", "src": fp32_src, "out": out, "kill": kill})
    assert r.returncode == -signal.SIGKILL, r.stderr[-500:]
    if expect == "none":
        assert not out.exists()
    else:
        assert Manifest.read(out).precision == expect
        assert np.isfinite(OnnxCausalLM(out, "cpu", 1).forward(IDS, np.ones((1, 5), np.int64),
                                                               np.arange(5)[None])[0]).all()
    r = run_child({"job": "quantize", "src": fp32_src, "out": out})
    assert r.returncode == 0, r.stderr[-800:]
    assert Manifest.read(out).precision == "int4" and leftovers(out) == []


@pytest.mark.parametrize("kill", [("tqdm.auto", "tqdm.update", 2), ("os", "replace", 1)], ids=["assembling", "rename"])
def test_fetch_killed_leaves_no_model_and_the_next_fetch_recovers(tmp_path, kill):
    payload = b"".join(fake_payload(name) for name, _, _ in FAKE_PARTS)
    spec = {"job": "fetch", "cache": tmp_path / "cache", "sha256": hashlib.sha256(payload).hexdigest()}
    r = run_child({**spec, "kill": list(kill)})
    assert r.returncode == -signal.SIGKILL, r.stderr[-500:]
    gdir = tmp_path / "cache" / "gguf"
    assert not (gdir / "fake.gguf").exists()
    assert [p.name for p in gdir.iterdir() if p.name.endswith(".partial")]  # the killed run's temporary file
    r = run_child(spec)
    assert r.returncode == 0, r.stderr[-800:]
    assert sorted(p.name for p in gdir.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]
    assert (gdir / "fake.gguf").read_bytes() == payload
