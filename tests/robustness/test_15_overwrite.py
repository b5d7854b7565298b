"""Row 15, --overwrite: it replaces only a folder this toolkit wrote (parscale_edge.atomic.check_replaceable),
never the source, a folder holding the source, a link, or a folder with other files; every
command that writes a folder (export, quantize, convert, train) is refused with one line, exit 2,
and every file is still there."""
import json
import os

import pytest

from parscale_edge.atomic import OWNER_FILE, OutputPathError, atomic_folder
from parscale_edge.cli import main
from parscale_edge.loading import save_hf_folder
from parscale_edge.manifest import MANIFEST_FILE
from parscale_edge.export import export_onnx
from tiny import tiny_model


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    return save_hf_folder(tiny_model("qwen2", 1), tmp_path_factory.mktemp("ow") / "src")


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(argv, capsys, *words):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_export_onto_its_source_is_refused(hf_src, capsys):
    before = snapshot(hf_src)
    refused(["-q", "export", str(hf_src), "-o", str(hf_src), "--overwrite"], capsys, "is the source")
    assert snapshot(hf_src) == before


def test_export_onto_the_folder_holding_the_source_is_refused(tmp_path, capsys):
    par = tmp_path / "par"
    src = save_hf_folder(tiny_model("qwen2", 1), par / "src")
    (par / "notes.txt").write_text("mine")
    before = snapshot(par)
    refused(["-q", "export", str(src), "-o", str(par), "--overwrite"], capsys, "holds the source")
    assert snapshot(par) == before


def test_export_through_a_link_to_the_source_is_refused(hf_src, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(hf_src)
    before = snapshot(hf_src)
    refused(["-q", "export", str(hf_src), "-o", str(link), "--overwrite"], capsys, "link")
    assert snapshot(hf_src) == before and link.is_symlink()


def test_a_folder_of_user_files_is_refused(hf_src, tmp_path, capsys):
    user = tmp_path / "docs"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    refused(["-q", "export", str(hf_src), "-o", str(user), "--overwrite"], capsys, "not written by parscale-edge")
    assert (user / "thesis.tex").read_text() == "years of work"
    with pytest.raises(OutputPathError):
        with atomic_folder(user, overwrite=True):
            pass
    assert (user / "thesis.tex").exists()


def test_an_export_folder_with_a_user_file_added_is_refused(hf_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "export", str(hf_src), "-o", str(out)]) == 0
    assert (out / OWNER_FILE).exists() and MANIFEST_FILE in json.loads((out / OWNER_FILE).read_text())["files"]
    (out / "notes.txt").write_text("mine")
    refused(["-q", "export", str(hf_src), "-o", str(out), "--overwrite"], capsys, "notes.txt")
    assert (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    assert main(["-q", "export", str(hf_src), "-o", str(out), "--overwrite"]) == 0  # our own folder: replaced


def test_an_older_export_without_the_owner_file_is_still_replaced(tmp_path):
    out = export_onnx(tiny_model("qwen2", 1), tmp_path / "old")
    (out / OWNER_FILE).unlink()
    export_onnx(tiny_model("qwen2", 1, seed=3), out, overwrite=True)
    assert (out / OWNER_FILE).exists()


def test_quantize_onto_its_source_is_refused(tmp_path, capsys):
    src = export_onnx(tiny_model("qwen2", 1), tmp_path / "fp32")
    before = snapshot(src)
    refused(["-q", "quantize", str(src), "-o", str(src), "--overwrite", "--precision", "int8", "--block-size", "16"],
            capsys, "is the source")
    assert snapshot(src) == before
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder

    with pytest.raises(OutputPathError, match="the source"):
        quantize_folder(src, src, QuantConfig(precision="int8", block_size=16), overwrite=True)
    assert snapshot(src) == before


def test_convert_onto_its_source_is_refused(tmp_path, capsys):
    src = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "src")
    before = snapshot(src)
    refused(["-q", "convert", str(src), "-P", "2", "-o", str(src), "--overwrite"], capsys, "is the source")
    assert snapshot(src) == before


def test_train_overwrite_keeps_the_source_and_user_files(hf_src, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("x = 1\n" * 50)
    before = snapshot(hf_src)
    refused(["-q", "train", str(hf_src), "-P", "2", "--data", str(data), "--eval", "none", "-o", str(hf_src),
             "--overwrite", "--steps", "1"], capsys, "the source")
    assert snapshot(hf_src) == before
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.json").write_text("{}")
    (run / "mine.py").write_text("print(1)")
    refused(["-q", "train", str(hf_src), "-P", "2", "--data", str(data), "--eval", "none", "-o", str(run),
             "--overwrite", "--steps", "1"], capsys, "mine.py")
    assert (run / "mine.py").exists() and (run / "history.json").exists()


def test_an_empty_folder_may_be_replaced(hf_src, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["-q", "export", str(hf_src), "-o", str(out), "--overwrite"]) == 0
    assert (out / MANIFEST_FILE).exists() and os.listdir(out)


def test_an_export_inside_the_source_folder_may_be_replaced(tmp_path):
    src = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "src")
    assert main(["-q", "export", str(src), "-o", str(src / "onnx")]) == 0
    assert main(["-q", "export", str(src), "-o", str(src / "onnx"), "--overwrite"]) == 0
    assert (src / "config.json").exists() and (src / "onnx" / MANIFEST_FILE).exists()
