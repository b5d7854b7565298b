"""Row 16, stale cache: the cached export of a Hugging Face folder or GGUF file is keyed on every
input file (name, size, mtime, inode; content hash of the small ones), so replacing the weights or
editing config.json / the chat template in place exports again instead of reusing the old export."""
import json
import os

import numpy as np
import pytest

from parscale_edge.prepare import ensure_export, export_cache_folder
from parscale_edge.loading import save_hf_folder
from parscale_edge.manifest import Manifest
from parscale_edge.runtime import OnnxCausalLM
from tiny import tiny_model
from tiny_gguf import write_tiny_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARSCALE_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def logits(folder):
    return OnnxCausalLM(folder, "cpu", 1).score(np.array([[1, 2, 3]]))


def keep_times(path, edit):
    """Run ``edit`` on ``path`` and restore its mtime (a same-second edit, or `cp -p`)."""
    st = path.stat()
    edit()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_replaced_weights_export_again(cache, tmp_path):
    src = save_hf_folder(tiny_model("qwen2", 1, seed=1), tmp_path / "src")
    first = ensure_export(str(src), progress=False)
    other = save_hf_folder(tiny_model("qwen2", 1, seed=2), tmp_path / "other")
    assert (other / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    keep_times(src / "model.safetensors",
               lambda: (src / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes()))
    second = ensure_export(str(src), progress=False)
    assert second != first
    assert Manifest.read(second).source_sha256 != Manifest.read(first).source_sha256
    assert not np.allclose(logits(first), logits(second))
    assert ensure_export(str(src), progress=False) == second  # unchanged input: the cache is reused


@pytest.mark.parametrize("name,edit", [
    ("config.json", lambda d: d.update(rms_norm_eps=0.5)),
    ("tokenizer_config.json", lambda d: d.update(chat_template="{{ messages[0]['content'] }}")),
])
def test_edited_config_or_chat_template_exports_again(cache, tmp_path, name, edit):
    from parscale_edge.loading import load_gguf  # the tiny GGUF brings a tokenizer with a chat template

    write_tiny_gguf(tmp_path / "t.gguf", "qwen2")
    src = save_hf_folder(load_gguf(tmp_path / "t.gguf", progress=False), tmp_path / "src")
    first = ensure_export(str(src), progress=False)
    f = src / name
    d = json.loads(f.read_text())
    edit(d)
    keep_times(f, lambda: f.write_text(json.dumps(d)))
    assert export_cache_folder(str(src)) != first
    second = ensure_export(str(src), progress=False)
    if name == "config.json":
        assert not np.allclose(logits(first), logits(second))
    else:
        assert json.loads((second / name).read_text())["chat_template"] == d["chat_template"]


def test_replaced_gguf_exports_again(cache, tmp_path):
    f = tmp_path / "m.gguf"
    write_tiny_gguf(f, "qwen2")
    first = ensure_export(str(f), progress=False)
    write_tiny_gguf(tmp_path / "n.gguf", "qwen2", seed=5)
    data = (tmp_path / "n.gguf").read_bytes()
    assert len(data) == f.stat().st_size
    keep_times(f, lambda: f.write_bytes(data))
    assert ensure_export(str(f), progress=False) != first
