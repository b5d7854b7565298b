"""Row 11, files: a truncated weight file (safetensors, GGUF, ONNX external data), a truncated
model.onnx, a manifest whose P or shapes disagree with the graph, a tokenizer from another model:
each is found at load with one error line that names the file and the fix."""
import json
import shutil

import numpy as np
import onnx
import pytest
from safetensors.torch import load_file, save_file

from parscale_edge.cli import main
from parscale_edge.loading import CheckpointError, load_gguf, load_hf_folder, save_hf_folder
from parscale_edge.manifest import DATA_FILE, MANIFEST_FILE, MODEL_FILE
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.validate import ExportFolderError, read_graph_summary
from tiny import tiny_model
from tiny_gguf import write_tiny_gguf


@pytest.fixture
def copy_of(tmp_path):
    def make(rt, name="m"):
        return shutil.copytree(rt.folder, tmp_path / name)
    return make


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def assert_cli_error(folder, msg, capsys):
    """`parscale generate` on the folder: exit 2, one `error:` line with ``msg``, no traceback."""
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "-p", "hi", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------ ONNX export folder
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_external_data(tiny_exports, copy_of, keep, capsys):
    d = copy_of(tiny_exports[2][1])
    full = (d / DATA_FILE).stat().st_size
    _cut(d / DATA_FILE, keep)
    with pytest.raises(ExportFolderError) as e:
        OnnxCausalLM(d, "cpu", 1)
    msg = str(e.value)
    assert f"{d / DATA_FILE} is truncated: it has {int(full * keep)} bytes but {MODEL_FILE} needs {full}" in msg
    assert "re-export" in msg
    assert_cli_error(d, "is truncated", capsys)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.95])
def test_truncated_graph_file(tiny_exports, copy_of, keep, capsys):
    d = copy_of(tiny_exports[1][1])
    _cut(d / MODEL_FILE, keep)
    with pytest.raises(ExportFolderError, match=rf"{d / MODEL_FILE} (is truncated|is not a readable ONNX model).*re-export"):
        OnnxCausalLM(d, "cpu", 1)
    assert_cli_error(d, str(d / MODEL_FILE), capsys)


def test_missing_data_file(tiny_exports, copy_of):
    d = copy_of(tiny_exports[1][1])
    (d / DATA_FILE).unlink()
    with pytest.raises(ExportFolderError, match=rf"{d / DATA_FILE} is missing .*copy the whole folder again"):
        OnnxCausalLM(d, "cpu", 1)


@pytest.mark.parametrize("field,value,what", [
    ("parscale_n", 4, "P = 4, the graph has 2 (metadata parscale_n)"),
    ("num_layers", 3, "num_layers = 3, the graph has 2"),
    ("num_key_value_heads", 3, "num_key_value_heads = 3, the graph has 2"),
    ("head_dim", 32, "head_dim = 32, the graph has 16"),
    ("vocab_size", 151936, "vocab_size = 151936, the graph has 97"),
])
def test_manifest_that_disagrees_with_the_graph(tiny_exports, copy_of, field, value, what, capsys):
    d = copy_of(tiny_exports[2][1])
    man = json.loads((d / MANIFEST_FILE).read_text())
    man[field] = value
    (d / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(ExportFolderError) as e:
        OnnxCausalLM(d, "cpu", 1)
    assert f"{d / MANIFEST_FILE} does not belong to {d / MODEL_FILE}: the manifest says {what}" in str(e.value)
    assert "Restore the manifest.json written with this model" in str(e.value)
    assert_cli_error(d, "does not belong to", capsys)


def test_manifest_of_another_export_swapped_in(tiny_exports, copy_of):
    d = copy_of(tiny_exports[4][1])
    shutil.copy(tiny_exports[8][1].folder / MANIFEST_FILE, d / MANIFEST_FILE)
    with pytest.raises(ExportFolderError, match="the manifest says P = 8, the graph has 4"):
        OnnxCausalLM(d, "cpu", 1)


def test_graph_summary_reads_what_onnx_reads(tiny_exports):
    rt = tiny_exports[4][1]
    s = read_graph_summary(rt.folder / MODEL_FILE)
    m = onnx.load(str(rt.folder / MODEL_FILE), load_external_data=False)
    assert s.metadata == {p.key: p.value for p in m.metadata_props}
    assert list(s.inputs) == [i.name for i in m.graph.input] and list(s.outputs) == [o.name for o in m.graph.output]
    dims = lambda vi: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert all(s.inputs[i.name] == dims(i) for i in m.graph.input)
    assert s.initializers == {t.name: list(t.dims) for t in m.graph.initializer}
    ext = {t.name: {e.key: e.value for e in t.external_data} for t in m.graph.initializer if t.data_location == 1}
    assert {r.tensor: (r.location, r.offset, r.length) for r in s.external} == \
           {k: (v["location"], int(v.get("offset", 0)), int(v["length"])) for k, v in ext.items()}


# ----------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_from_another_model(text_export, tiny_exports, copy_of, capsys):
    # a 271-token tokenizer dropped into a model with 97 embedding rows
    d = copy_of(tiny_exports[2][1], "small")
    shutil.copy(text_export.folder / "tokenizer.json", d / "tokenizer.json")
    rt = OnnxCausalLM(d, "cpu", 1)
    with pytest.raises(ExportFolderError, match=rf"{d / 'tokenizer.json'} has 271 tokens but the model has only 97 "
                                                r"embedding rows: the tokenizer belongs to another model; copy the "
                                                r"tokenizer.json exported with this model"):
        rt.tokenizer
    assert_cli_error(d, "belongs to another model", capsys)
    # a smaller tokenizer than the one exported with the model (recorded in the manifest)
    d2 = copy_of(text_export, "text")
    assert json.loads((d2 / MANIFEST_FILE).read_text())["tokenizer_vocab_size"] == 271
    tok = json.loads((d2 / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<tool_call>"]
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if v < 260}
    tok["model"]["merges"] = []
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < 260]
    (d2 / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ExportFolderError, match="has 260 tokens but the model was exported with a tokenizer of 271"):
        OnnxCausalLM(d2, "cpu", 1).tokenizer


# --------------------------------------------------------------------------------- checkpoints
def test_truncated_safetensors_shard_and_unreadable_index(tmp_path):
    out = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for f, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(out / f))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_hf_folder(out).model is not None
    _cut(out / "model-00002-of-00002.safetensors", 0.7)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: cannot read safetensors file .*"
                                              r"corrupt or truncated, download it again"):
        load_hf_folder(out)
    (out / "model.safetensors.index.json").write_text(json.dumps(index)[:40])
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json is unreadable .*truncated or corrupt"):
        load_hf_folder(out)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_gguf(tmp_path, keep, capsys):
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f, "qwen2")
    _cut(f, keep)
    with pytest.raises(ValueError, match=rf"{f} is not a valid GGUF file .*truncated or corrupt: delete it and download"):
        load_gguf(f, progress=False)
    capsys.readouterr()
    assert main(["-q", "export", str(f), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_intact_folder_still_loads_and_runs(tiny_exports, copy_of):
    d = copy_of(tiny_exports[2][1])
    a, _ = OnnxCausalLM(d, "cpu", 1).forward(np.array([[1, 2]]), np.ones((1, 2), np.int64), np.array([[0, 1]]))
    assert np.isfinite(a).all()
