"""The parscale CLI end to end on a tiny GGUF (export, generate, chat, convert, errors)."""
import io
import json

import numpy as np
import pytest

from parscale_edge.cli import main
from parscale_edge.manifest import Manifest
from tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_tiny_gguf(root / "tiny.gguf", "qwen2")
    return root / "tiny.gguf", root


def test_export_generate_and_chat(tiny, capsys, monkeypatch):
    gguf_path, root = tiny
    out = root / "p2"
    assert main(["-q", "export", str(gguf_path), "-o", str(out), "--parallel", "2"]) == 0
    man = Manifest.read(out)
    assert man.parscale_n == 2 and man.precision == "fp32" and len(man.source_sha256) == 64
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "-p", "hello world", "-n", "6"]) == 0
    text = capsys.readouterr().out
    assert main(["generate", "--model", str(out), "-p", "hello world", "-n", "6"]) == 0
    assert capsys.readouterr().out == text  # greedy is deterministic
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nworld\n/exit\n"))
    assert main(["chat", "--model", str(out), "-n", "4"]) == 0
    assert "P=2" in capsys.readouterr().err


def test_convert_writes_authors_format(tiny, capsys):
    gguf_path, root = tiny
    out = root / "hf-p2"
    assert main(["-q", "convert", str(gguf_path), "--parallel", "2", "-o", str(out), "--eval-positions", "0"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_parscale" and cfg["parscale_n"] == 2
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--model", "/nonexistent/model", "-p", "x"], "no such file or folder: /nonexistent/model"),
    (["generate", "--parallel", "0", "-p", "x"], "--parallel must be >= 1"),
    (["generate", "--model", "smollm-135m", "-p", "x"], "smollm2-135m"),  # typo: known ids are listed
    (["generate", "-n", "0", "-p", "x"], "max_new_tokens must be >= 1"),
    (["generate", "--top-p", "0", "-p", "x"], "top_p must be in (0, 1]"),
])
def test_bad_input_is_one_clear_error_line(argv, msg, capsys, monkeypatch):
    monkeypatch.setattr("parscale_edge.cli.ensure_export", lambda *a, **k: pytest.fail("must fail before loading"))
    if argv[2].startswith(("/", "smollm-", "0")):
        monkeypatch.undo()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err


def test_export_folder_with_other_p_is_refused(tiny, capsys):
    gguf_path, root = tiny
    out = root / "p1"
    assert main(["-q", "export", str(gguf_path), "-o", str(out)]) == 0
    assert main(["generate", "--model", str(out), "-P", "4", "-p", "x"]) == 2
    assert "offers P in [1], not 4" in capsys.readouterr().err


def test_ensure_export_caches_one_backbone_for_several_p(tiny, tmp_path, monkeypatch):
    """ensure_export(spec, [P...]) writes one fused folder offering every P (what `export -P 1,2,4`
    writes), reuses it, and an export folder must offer every P asked for."""
    from parscale_edge.prepare import ParallelError, ensure_export
    from parscale_edge.runtime import OnnxCausalLM, SamplingConfig

    gguf_path, root = tiny
    monkeypatch.setenv("PARSCALE_EDGE_CACHE", str(tmp_path / "cache"))
    out = ensure_export(str(gguf_path), [4, 1, 2], threads=1, progress=False)
    assert out.name.startswith("tiny-") and out.name.endswith("-p1-2-4-fp32")
    rt = OnnxCausalLM(out, device="cpu", threads=1)
    assert rt.manifest.graph == "fused" and rt.parallel_choices == [1, 2, 4]
    assert main(["-q", "export", str(gguf_path), "-o", str(root / "shared"), "-P", "1,2,4"]) == 0
    ref = OnnxCausalLM(root / "shared", device="cpu", threads=1)
    for P in (1, 2, 4):  # the same conversions as the export command's
        assert rt.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=6), [], parallel=P) == \
            ref.generate([[5, 6, 7]], SamplingConfig(max_new_tokens=6), [], parallel=P)
    mtime = (out / "model.onnx").stat().st_mtime_ns
    assert ensure_export(str(gguf_path), (1, 2, 4), progress=False) == out and \
        (out / "model.onnx").stat().st_mtime_ns == mtime  # cached: not exported again
    assert ensure_export(str(out), [2, 4]) == out
    with pytest.raises(ParallelError, match=r"offers P in \[1, 2, 4\], not 3, 8; re-export with P 2,3,8") as e:
        ensure_export(str(out), [2, 3, 8])
    assert e.value.naming("--parallel").endswith("re-export with --parallel 2,3,8")  # what the CLI says


def test_output_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["export", "smollm2-135m", "-o", str(f), "--overwrite"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_threads_accepted_after_the_subcommand(tiny, capsys):
    gguf_path, root = tiny
    out = root / "p1t"
    assert main(["export", str(gguf_path), "-o", str(out), "-q", "--threads", "1"]) == 0
    assert main(["generate", "--model", str(out), "-p", "hello", "-n", "2", "--threads", "1"]) == 0
    mode = (out / "model.onnx.data").stat().st_mode & 0o777
    assert mode & 0o044 == 0o044  # readable by others, not left private by mkdtemp


def test_quantize_eval_and_compare_commands(tiny, tmp_path, capsys):
    gguf_path, root = tiny
    fp32 = root / "fp32-q"
    assert main(["-q", "export", str(gguf_path), "-o", str(fp32)]) == 0
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    q = tmp_path / "q4"
    assert main(["quantize", str(fp32), "-o", str(q), "--text", str(text), "--compare-positions", "64",
                 "--check-positions", "32"]) == 0
    out = capsys.readouterr().out
    assert "quality cost vs fp32 (64 positions)" in out and "MiB" in out
    assert main(["quantize", str(q), "-o", str(tmp_path / "qq")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["eval", str(q), "--text", str(text), "--max-positions", "100", "--json", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["positions"] == 100 and e["precision"] == "int4" and e["perplexity"] > 1
    assert main(["compare", str(fp32), str(q), "--text", str(text), "--max-positions", "100",
                 "--json", str(tmp_path / "c.json")]) == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["positions"] == 100 and 0 <= c["top1_agreement"] <= 1 and c["kl_mean"] >= 0
    assert main(["export", str(gguf_path), "-o", str(tmp_path / "e8"), "--precision", "int8", "-q",
                 "--compare-positions", "0", "--check-positions", "0"]) == 0
    assert Manifest.read(tmp_path / "e8").precision == "int8"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left
    assert main(["quantize", str(fp32), "-o", str(tmp_path / "bad"), "--block-size", "24"]) == 2
    assert "power of two" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_profile_command_with_versus_dense(tiny, tmp_path, capsys, monkeypatch):
    gguf_path, _ = tiny
    monkeypatch.setenv("PARSCALE_EDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "prof"
    assert main(["-q", "profile", str(gguf_path), "--parallel", "1,2", "--batch", "1,2", "--prompt-len", "4",
                 "--gen-len", "3", "--repeat", "1", "--warmup", "0", "--threads", "1", "--versus-dense",
                 "-o", str(out)]) == 0
    res = json.loads((out / "profile.json").read_text())
    kinds = sorted((r["kind"], r["P"], r["batch"]) for r in res["rows"])
    assert kinds == [("dense", 2, 1), ("dense", 2, 2), ("parscale", 1, 1), ("parscale", 1, 2),
                     ("parscale", 2, 1), ("parscale", 2, 2)]
    assert {s["batch"] for s in res["versus_dense"]} == {1, 2}
    assert res["machine"]["bandwidth"]["read_gbps"] > 0 and "random" in res["note"]
    assert (out / "profile.csv").read_text().count("\n") == 7
    for png in ("profile_decode.png", "profile_memory.png", "versus_dense.png"):
        assert (out / png).stat().st_size > 1000
    assert "ParScale against parameter scaling" in capsys.readouterr().out
    assert main(["profile", "--batch", "0", "-o", str(out)]) == 2


def test_scaling_law_commands(tmp_path, capsys):
    assert main(["scaling-law", "fit", "--json", str(tmp_path / "fit.json")]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert round(fit["stack-v2-python"]["k"], 3) == 0.393 and round(fit["pile"]["alpha"], 3) == 0.196
    assert main(["scaling-law", "predict", "-N", "1.6B", "-P", "1,8", "--json", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert rows[1]["dense_equivalent_params"] / 1.6e9 == pytest.approx(1.818, abs=1e-3)
    assert main(["scaling-law", "predict", "-N", "lots"]) == 2
    assert "cannot read a parameter count" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["profile", "--gen-len", "0", "-o", "OUT"], "--gen-len and --repeat must be >= 1"),
    (["profile", "--repeat", "0", "-o", "OUT"], "--gen-len and --repeat must be >= 1"),
    (["scaling-law", "predict", "-N", "-5"], "must be > 0"),
    (["quantize", "tests", "-o", "OUT", "--precision", "int3"], "unknown precision 'int3'"),
])
def test_more_bad_input_fails_cleanly_before_output(argv, msg, tmp_path, capsys):
    argv = [str(tmp_path / "out") if x == "OUT" else x for x in argv]
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith("error: ") and msg in cap.err and cap.out == ""
    assert not (tmp_path / "out").exists()


def test_eval_rejects_empty_ranges(golden_exports, capsys, tmp_path):
    from parscale_edge.evaluate import perplexity

    for kw, msg in ((dict(max_positions=0), "max_positions must be >= 1"), (dict(window=1), "at least 2 tokens"),
                    (dict(stride=0), "stride must be in 1..window")):
        with pytest.raises(ValueError, match=msg):
            perplexity(lambda ids: np.zeros(ids.shape + (4,)), [1, 2, 3, 0], **kw)


def test_ensure_export_puts_a_trained_adapter_beside_conversions(tmp_path, monkeypatch):
    """The demo's default left model: one backbone offering P=1, the adapter's P=2 (trained parts,
    exactly the adapter's tensors) and P=4 (a conversion); cached under a name that carries the adapter."""
    import torch
    from safetensors.numpy import load_file

    from parscale_edge.adapter import save_adapter
    from parscale_edge.prepare import ensure_export
    from parscale_edge.loading import convert_to_parscale, save_hf_folder
    from tiny import tiny_model

    monkeypatch.setenv("PARSCALE_EDGE_CACHE", str(tmp_path / "cache"))
    dense = tiny_model("qwen2", P=1, seed=11)
    hf = save_hf_folder(dense, tmp_path / "hf")
    p2 = convert_to_parscale(dense, 2, n_tokens=3)
    with torch.no_grad():
        p2.model.model.layers[0].self_attn.prefix_k.add_(0.5)  # "trained": differs from a fresh conversion
    adapter = save_adapter(p2.model, tmp_path / "a.safetensors", "tiny")
    out = ensure_export(str(hf), [2, 1, 4], threads=1, progress=False, adapters=[str(adapter)])
    man = Manifest.read(out)
    assert sorted(man.parallel_options) == ["1", "2", "4"] and "-a" in out.name
    parts, trained = load_file(str(out / man.parallel_options["2"])), load_file(str(adapter))
    for k, v in trained.items():
        np.testing.assert_array_equal(parts[k], v)
    assert ensure_export(str(hf), [2, 1, 4], threads=1, progress=False, adapters=[str(adapter)]) == out  # cached


def test_demo_help_shows_the_demo_defaults():
    from parscale_edge.cli import DEMO_DEFAULTS_HELP
    from parscale_edge.demo.models import DEFAULTS

    assert DEMO_DEFAULTS_HELP == {"left": DEFAULTS.left, "left_parallel": ",".join(map(str, DEFAULTS.left_parallel)),
                                  "right": DEFAULTS.right, "right_parallel": ",".join(map(str, DEFAULTS.right_parallel)),
                                  "precision": DEFAULTS.precision}


def test_help_does_not_import_the_demo_or_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom parscale_edge.cli import build_parser\nbuild_parser()\n"
            "print([m for m in sys.modules if m.startswith(('parscale_edge.demo', 'torch', 'onnxruntime', 'gradio'))])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
