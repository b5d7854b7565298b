"""Row 20, output paths and the machine: output files (--json, profile -o) and input files named by a
flag (--text, --calibration) are checked before any work and named as the user wrote them (never
the hidden ``.tmp-...partial`` file); a full disk, a missing network to the package index or a
read-only folder is one error line naming the cause and the fix (exit 2), with nothing left behind."""
import errno
import subprocess

import onnx
import pytest

from parscale_edge import hub
from parscale_edge.atomic import OutputPathError, write_json
from parscale_edge.cli import main
from parscale_edge.loading import save_hf_folder
from tiny import tiny_model


def one_line(capsys, argv, *words):
    capsys.readouterr()
    assert main(argv) == 2
    err = "".join(ln for ln in capsys.readouterr().err.splitlines(True) if not ln.startswith("warning: "))
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert ".tmp-" not in err and ".partial" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    import parscale_edge.cli
    import parscale_edge.prepare

    def boom(*a, **k):
        raise AssertionError("the output path was not checked before the work")
    for module in (parscale_edge.cli, parscale_edge.prepare):
        monkeypatch.setattr(module, "ensure_export", boom)
        monkeypatch.setattr(module, "load_for_export", boom)


@pytest.mark.parametrize("cmd", [["eval", "{m}"], ["compare", "{m}", "{m}"], ["scaling-law", "fit"],
                                 ["device-info"]])
def test_json_to_a_folder_fails_before_the_work(text_export, tmp_path, cmd, no_work, capsys):
    argv = [c.format(m=text_export.folder) for c in cmd] + ["--json", str(tmp_path)]
    one_line(capsys, argv, f"--json {tmp_path} is a folder")


def test_profile_output_that_is_a_file_fails_before_the_work(tmp_path, no_work, capsys):
    f = tmp_path / "results"
    f.write_text("mine")
    one_line(capsys, ["profile", "smollm2-135m", "-o", str(f)], str(f), "not a folder")
    assert f.read_text() == "mine"


def test_write_json_names_the_users_path(tmp_path):
    with pytest.raises(OutputPathError, match=rf"{tmp_path} is a folder"):
        write_json(tmp_path, {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match=rf"cannot write {tmp_path / 'file' / 'r.json'}: "):
        write_json(tmp_path / "file" / "r.json", {})
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("cmd,flag", [(["eval", "{m}"], "text"), (["quantize", "{m}", "-o", "{out}"], "calibration"),
                                      (["quantize", "{m}", "-o", "{out}"], "text")])
def test_a_missing_input_file_names_its_flag(text_export, tmp_path, cmd, flag, no_work, capsys):
    argv = [c.format(m=text_export.folder, out=tmp_path / "q") for c in cmd] + [f"--{flag}", str(tmp_path / "nope.txt")]
    one_line(capsys, argv, f"--{flag} {tmp_path / 'nope.txt'} does not exist")
    assert not (tmp_path / "q").exists()


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    src = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "src")
    real = onnx.save_model

    def full(proto, path, *a, **k):
        real(proto, path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device", str(path) + ".data")
    monkeypatch.setattr(onnx, "save_model", full)
    err = one_line(capsys, ["-q", "export", str(src), "-o", str(tmp_path / "out")], "no space left on the device",
                   str(tmp_path / "out"), "Free space there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], err


@pytest.mark.parametrize("stderr,words", [
    ("WARNING: Retrying ... NewConnectionError('Failed to establish a new connection: [Errno -3] Temporary failure "
     "in name resolution')\nERROR: Could not find a version that satisfies the requirement x==1 (from versions: none)\n"
     "ERROR: No matching distribution found for x==1\n", ["cannot reach the package index", "check the network"]),
    ("ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device\n",
     ["no space left on the disk holding", "PARSCALE_EDGE_CACHE"]),
])
def test_a_fetch_without_network_or_space_is_one_line(tmp_path, monkeypatch, stderr, words, capsys):
    monkeypatch.setenv("PARSCALE_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", stderr))
    one_line(capsys, ["-q", "generate", "-p", "hi"], *words)
    assert not (tmp_path / "cache" / "gguf" / "smollm2-135m.gguf").exists()


def test_an_output_under_a_file_is_refused_before_the_work(tmp_path, no_work, capsys):
    (tmp_path / "afile").write_text("x")
    one_line(capsys, ["-q", "export", "smollm2-135m", "-o", str(tmp_path / "afile" / "out")], "is a file, not a folder")


@pytest.mark.parametrize("cmd", [["eval", "{m}"], ["compare", "{m}", "{m}"]])
def test_a_window_beyond_the_context_is_refused_before_scoring(text_export, cmd, capsys):
    one_line(capsys, [c.format(m=text_export.folder) for c in cmd] + ["--window", "1000"],
             "--window 1000 is longer than the model's context of 256 tokens")
