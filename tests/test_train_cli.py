"""`parscale train` and `parscale export --adapter` end to end on a tiny GGUF, and two-process DDP."""
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy

from parscale_edge.adapter import apply_adapter
from parscale_edge.cli import main
from parscale_edge.loading import load_gguf
from parscale_edge.manifest import Manifest
from tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["hello", "world", "def", "return", "for", "in", "range", "12", "x", "y", "🙂"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-cli")
    write_tiny_gguf(root / "tiny.gguf", "qwen2")
    rng = random.Random(0)
    (root / "train.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(2500)))
    (root / "eval.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(500)))
    return root


def _train_args(root, out, *extra):
    return ["-q", "train", str(root / "tiny.gguf"), "-P", "2", "--data", str(root / "train.txt"), "--eval",
            str(root / "eval.txt"), "-o", str(out), "--steps", "4", "--seq-len", "32", "--grad-accum", "2",
            "--prefix-tokens", "4", "--eval-every", "2", "--checkpoint-every", "2", "--eval-positions", "100",
            "--eval-window", "64", *extra]


def test_train_then_export_with_adapter_matches_pytorch(tiny, capsys):
    out = tiny / "run"
    assert main(_train_args(tiny, out)) == 0
    stdout = capsys.readouterr().out
    assert f"trained {4 * 32 * 2} tokens" in stdout and "held-out perplexity (100 positions): dense P=1" in stdout
    adapter = out / "adapter.safetensors"
    with safe_open(str(adapter), framework="np") as f:
        meta = f.metadata()
    assert meta["parscale_n"] == "2" and meta["parscale_n_tokens"] == "4" and meta["num_layers"] == "2"

    exp = tiny / "exported"
    assert main(["-q", "export", str(tiny / "tiny.gguf"), "--adapter", str(adapter), "-o", str(exp)]) == 0
    man = Manifest.read(exp)
    assert man.parscale_n == 2 and man.parscale_n_tokens == 4
    assert man.extra["backbone_sha256"] == meta["backbone_sha256"]

    from parscale_edge.runtime import OnnxCausalLM

    ref = apply_adapter(load_gguf(tiny / "tiny.gguf", progress=False), adapter).model
    ids = np.array([[5, 70, 80, 9, 100, 3]], dtype=np.int64)
    pos = np.arange(6)[None]
    onnx_logits = OnnxCausalLM(exp, device="cpu", threads=1).score(ids)
    with torch.no_grad():
        t = torch.from_numpy(ids)
        torch_logits = ref(t, torch.ones_like(t), torch.from_numpy(pos))[0].numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)


@pytest.mark.parametrize("case,msg", [
    ("overlap", "also training data"),
    ("resume", "--resume: no checkpoint.safetensors"),
    ("nonempty", "is not empty; pass --resume"),
    ("tokens", "--tokens must be >= 1"),
    ("parallel", "--parallel must be >= 2"),
])
def test_bad_train_input_is_one_clear_error_line(tiny, tmp_path, case, msg, capsys, monkeypatch):
    monkeypatch.setattr("parscale_edge.loading.load_model", lambda *a, **k: pytest.fail("must fail before loading"))
    out = tmp_path / "o"
    args = _train_args(tiny, out)
    if case == "overlap":
        args[args.index("--eval") + 1] = str(tiny / "train.txt")
    elif case == "resume":
        args.append("--resume")
    elif case == "nonempty":
        out.mkdir()
        (out / "x").write_text("x")
    elif case == "tokens":
        i = args.index("--steps")
        args[i:i + 2] = ["--tokens", "0"]
    else:
        args[args.index("-P") + 1] = "1"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err


def test_export_refuses_an_adapter_of_another_backbone(tiny, tmp_path, capsys):
    if not (tiny / "run" / "adapter.safetensors").exists():
        assert main(_train_args(tiny, tiny / "run")) == 0
    write_tiny_gguf(tmp_path / "other.gguf", "qwen2", seed=7)
    capsys.readouterr()
    assert main(["-q", "export", str(tmp_path / "other.gguf"), "--adapter", str(tiny / "run" / "adapter.safetensors"),
                 "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "trained on another backbone: adapter backbone_sha256" in err
    assert not (tmp_path / "x").exists()


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tiny, tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 1 each == 1 process with batch 2: same samples,
    same mean gradient, so the same adapter within float tolerance."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(_train_args(tiny, single, "--batch", "2", "--eval", "none")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "parscale_edge.cli",
           *_train_args(tiny, ddp, "--batch", "1", "--eval", "none")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) on cpu" in r.stderr
    a = load_numpy(str(single / "adapter.safetensors"))
    b = load_numpy(str(ddp / "adapter.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)
    import json
    hs = json.loads((single / "history.json").read_text())
    hd = json.loads((ddp / "history.json").read_text())
    assert hd["world_size"] == 2 and hd["tokens_per_step"] == hs["tokens_per_step"] == 2 * 32 * 2
    np.testing.assert_allclose([s["loss"] for s in hd["steps"]], [s["loss"] for s in hs["steps"]], atol=1e-5)


def test_named_model_with_an_adapter_of_another_named_model_is_refused_before_download(tmp_path, monkeypatch,
                                                                                        capsys):
    """The shipped smollm2-135m adapter given to `export qwen2.5-coder-0.5b`: refused from the
    adapter's metadata, naming both models, without fetching anything."""
    import parscale_edge.hub

    def no_fetch(*a, **k):
        raise AssertionError("fetched a model for an adapter that cannot fit it")

    monkeypatch.setattr(parscale_edge.hub, "fetch_gguf", no_fetch)
    monkeypatch.setenv("PARSCALE_EDGE_CACHE", str(tmp_path / "cache"))
    adapter = ROOT / "adapters" / "smollm2-135m-p2.safetensors"
    assert main(["-q", "export", "qwen2.5-coder-0.5b", "--adapter", str(adapter), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "trained on smollm2-135m, not qwen2.5-coder-0.5b" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists() and not (tmp_path / "cache").exists()
