"""The parscale CLI end to end on a tiny GGUF (export, generate, chat, convert, errors)."""
import io
import json

import pytest

from edge.cli import main
from edge.manifest import Manifest
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
    (["generate", "--model", "/nonexistent/model", "-p", "x"], "/nonexistent/model"),
    (["generate", "--model", "smollm-135m", "-p", "x"], "smollm2-135m"),  # typo: known ids are listed
    (["generate", "-n", "0", "-p", "x"], "max_new_tokens must be >= 1"),
    (["generate", "--top-p", "0", "-p", "x"], "top_p must be in (0, 1]"),
])
def test_bad_input_is_one_clear_error_line(argv, msg, capsys, monkeypatch):
    monkeypatch.setattr("edge.cli.ensure_export", lambda *a, **k: pytest.fail("must fail before loading"))
    if argv[2].startswith(("/", "smollm-")):
        monkeypatch.undo()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err


def test_export_folder_with_other_p_is_refused(tiny, capsys):
    gguf_path, root = tiny
    out = root / "p1"
    assert main(["-q", "export", str(gguf_path), "-o", str(out)]) == 0
    assert main(["generate", "--model", str(out), "-P", "4", "-p", "x"]) == 2
    assert "exported with P=1" in capsys.readouterr().err
