"""Row 24, messages that named the wrong cause or fix: a graph too new for this onnxruntime asks for a
newer onnxruntime (not a re-export, not cut mid-sentence); a data file linked from outside the
folder is called a link; a bf16 source is named as such by quantize; an empty safetensors file is
an incomplete download (not "run convert"); the unknown-GGUF-pre warning is repeated on cached
runs; an HF folder without a tokenizer is warned about at export; a model.onnx or .safetensors
file given as the model names the folder to pass; the peers table says "not measured"."""
import json
import shutil
from pathlib import Path

import onnx
import pytest
from safetensors.torch import save_file

from parscale_edge.cli import main
from parscale_edge.prepare import ensure_export
from parscale_edge.loading import CheckpointError, load_hf_folder, save_hf_folder
from parscale_edge.manifest import DATA_FILE, MANIFEST_FILE, MODEL_FILE
from parscale_edge.validate import ExportFolderError
from parscale_edge.export import export_onnx
from tiny import tiny_model
from tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[2]


def err_of(capsys, argv, code=2):
    capsys.readouterr()
    assert main(argv) == code
    return capsys.readouterr().err


@pytest.fixture
def export(tmp_path):
    return export_onnx(tiny_model("qwen2", 1), tmp_path / "m")


def test_a_graph_too_new_for_onnxruntime_asks_for_a_newer_onnxruntime(export, capsys):
    m = onnx.load(str(export / MODEL_FILE), load_external_data=False)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 30
    onnx.save(m, str(export / MODEL_FILE))
    err = err_of(capsys, ["generate", "-m", str(export), "-p", "hi"])
    assert "was made for a newer ONNX Runtime than this one" in err and "Opset 30" in err
    assert "pip install -U onnxruntime" in err and "re-export" not in err and err.count("\n") == 1, err


def test_a_data_file_linked_from_outside_is_called_a_link(export, tmp_path):
    outside = tmp_path / "elsewhere.data"
    shutil.move(export / DATA_FILE, outside)
    (export / DATA_FILE).symlink_to(outside)
    from parscale_edge.runtime import OnnxCausalLM

    with pytest.raises(ExportFolderError, match=rf"{export / DATA_FILE} is a link to {outside}, outside the model "
                                                r"folder; .*copy the file in instead of linking it"):
        OnnxCausalLM(export, "cpu", 1)


def test_quantize_names_a_bf16_source(export, capsys):
    man = json.loads((export / MANIFEST_FILE).read_text())
    man.update(precision="bf16", cache_dtype="bfloat16")
    (export / MANIFEST_FILE).write_text(json.dumps(man))
    err = err_of(capsys, ["quantize", str(export), "-o", str(export.parent / "q")])
    assert "is a bf16 export" in err and "not float" not in err, err


def test_an_empty_safetensors_file_is_an_incomplete_download(tmp_path):
    src = save_hf_folder(tiny_model("qwen2", 2), tmp_path / "src")
    save_file({}, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="hold\\(s\\) no tensors; the download is incomplete") as e:
        load_hf_folder(src)
    assert "convert" not in str(e.value)


def test_unknown_gguf_pre_is_warned_on_every_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PARSCALE_EDGE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f, "qwen2", pre="mystery-pre")
    with pytest.warns(UserWarning, match="unknown tokenizer.ggml.pre 'mystery-pre'"):
        first = ensure_export(str(f), progress=False)
    capsys.readouterr()
    assert ensure_export(str(f), progress=False) == first  # cached: the warning comes again
    assert "unknown tokenizer.ggml.pre 'mystery-pre'" in capsys.readouterr().err


def test_an_hf_folder_without_tokenizer_is_warned_at_export(tmp_path, capsys):
    src = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "src")
    assert not (src / "tokenizer.json").exists()
    err = err_of(capsys, ["-q", "export", str(src), "-o", str(tmp_path / "out")], code=0)
    assert "has no tokenizer.json" in err and "generate, chat and eval will refuse it" in err


@pytest.mark.parametrize("name", [MODEL_FILE, DATA_FILE])
def test_a_file_of_an_export_folder_names_the_folder(export, name, capsys):
    err = err_of(capsys, ["generate", "-m", str(export / name), "-p", "hi"])
    assert f"pass the folder that holds it, {export} (an export folder)" in err and err.count("\n") == 1, err


def test_a_safetensors_file_names_its_folder(tmp_path, capsys):
    src = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "src")
    err = err_of(capsys, ["generate", "-m", str(src / "model.safetensors"), "-p", "hi"])
    assert f"pass the folder that holds it, {src} (a Hugging Face folder)" in err, err


def test_peers_table_does_not_fail_an_unmeasured_logit_match():
    from bench_script import load_bench

    run = load_bench("peers/run.py")
    doc = {"results": [], "settings": {"prompt_len": 8, "gen_len": 4, "threads": 2, "repeat": 1},
           "logit_match": {"limit": 1e-3}}
    text = run.markdown(doc)
    assert "not measured" in text and "FAIL" not in text
    doc["logit_match"].update(ours_fp32_vs_optimum_max_abs=1.0, **{"pass": False})
    assert "FAIL" in run.markdown(doc)
