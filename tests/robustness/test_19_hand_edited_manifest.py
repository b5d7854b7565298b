"""Row 19, a hand-edited manifest.json: not an object, fields missing or of the wrong type, an unknown
graph kind or precision, a cache dtype that does not match the precision (or the graph), a fused
graph without parallel_options, part files outside the folder: one error line naming the manifest
and the field (Manifest.read validates; parscale_edge.validate compares with the graph), never a traceback
and never a file opened outside the folder."""
import json
import shutil

import pytest

from parscale_edge.cli import main
from parscale_edge.manifest import MANIFEST_FILE, Manifest, ManifestError
from parscale_edge.export import export_model
from tiny import tiny_model


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    return export_model(tiny_model("qwen2", 2, seed=1), tmp_path_factory.mktemp("man") / "fused")


def edited(src, tmp_path, change):
    d = shutil.copytree(src, tmp_path / "m")
    man = json.loads((d / MANIFEST_FILE).read_text())
    new = change(man)
    (d / MANIFEST_FILE).write_text(json.dumps(man if new is None else new))
    return d


CASES = [
    (lambda m: [m], "the manifest is a JSON list, not an object"),
    (lambda m: 3, "the manifest is a JSON int, not an object"),
    (lambda m: m.pop("vocab_size") and None, "field(s) vocab_size missing"),
    (lambda m: m.update(parscale_n="2"), "parscale_n must be a positive integer, got '2'"),
    (lambda m: m.update(num_layers=0), "num_layers must be a positive integer, got 0"),
    (lambda m: m.update(eos_token_ids="2"), "eos_token_ids must be a list of token ids"),
    (lambda m: m.pop("parallel_options") and None, "a fused graph needs parallel_options"),
    (lambda m: m.update(parallel_options=None), "a fused graph needs parallel_options"),
    (lambda m: m.update(cache_dtype="float16"), "cache_dtype 'float16' does not match precision fp32"),
    (lambda m: m.update(graph="banana"), "unknown graph kind 'banana'"),
    (lambda m: m.update(precision="fp64"), "unknown precision 'fp64'"),
    (lambda m: m["parallel_options"].update({"2": "../other/p2.safetensors"}), "not a file inside the folder"),
    (lambda m: m["parallel_options"].update({"2": "/etc/passwd"}), "not a file inside the folder"),
    (lambda m: m["parallel_options"].update({"3": None}), "gives P=3 no part file"),
    (lambda m: m.update(parallel_options={"1": None}), "lacks the default P=2"),
    (lambda m: m.update(extra=None), "extra must be an object"),
]


@pytest.mark.parametrize("change,msg", CASES, ids=[c[1][:40] for c in CASES])
def test_hand_edited_manifest_is_one_error_line(fused, tmp_path, change, msg, capsys):
    d = edited(fused, tmp_path, change)
    with pytest.raises(ManifestError, match="restore the manifest.json written with this model") as e:
        Manifest.read(d)
    assert msg in str(e.value) and str(d / MANIFEST_FILE) in str(e.value)
    capsys.readouterr()
    assert main(["generate", "-m", str(d), "-p", "hi", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_link_out_of_the_folder_is_refused(fused, tmp_path, capsys):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(fused / "parscale" / "p2.safetensors", outside)
    d = shutil.copytree(fused, tmp_path / "m")
    (d / "parscale" / "p2.safetensors").unlink()
    (d / "parscale" / "link.safetensors").symlink_to(outside)
    man = json.loads((d / MANIFEST_FILE).read_text())
    man["parallel_options"]["2"] = "parscale/link.safetensors"
    (d / MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(ManifestError, match="not a file inside the folder"):
        Manifest.read(d)


def test_precision_and_cache_dtype_edited_together_disagree_with_the_graph(fused, tmp_path, capsys):
    d = edited(fused, tmp_path, lambda m: m.update(precision="fp16", cache_dtype="float16"))
    capsys.readouterr()
    assert main(["generate", "-m", str(d), "-p", "hi", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert "the manifest says cache_dtype = float16, the graph has float32" in err and err.count("\n") == 1, err


def test_the_untouched_manifest_reads(fused):
    assert Manifest.read(fused).parallel_choices() == [2]


@pytest.mark.parametrize("graph", ["reference", "fused"])
def test_a_graph_kind_that_disagrees_with_the_graph(fused, tiny_exports, tmp_path, graph, capsys):
    src = fused if graph == "reference" else tiny_exports[2][1].folder  # the other kind's folder
    other = "fused" if graph == "reference" else "reference"
    d = edited(src, tmp_path, lambda m: m.update(graph=graph, parallel_options=m.get("parallel_options") or {"2": None}))
    if graph == "fused":  # a part file for P=2 so that the manifest itself reads
        man = json.loads((d / MANIFEST_FILE).read_text())
        (d / "parscale").mkdir()
        shutil.copy(fused / "parscale" / "p2.safetensors", d / "parscale" / "p2.safetensors")
        man["parallel_options"] = {"2": "parscale/p2.safetensors"}
        (d / MANIFEST_FILE).write_text(json.dumps(man))
    capsys.readouterr()
    assert main(["generate", "-m", str(d), "-p", "hi", "-n", "2"]) == 2
    err = capsys.readouterr().err
    assert f"the manifest says graph = {graph}, the graph has {other}" in err and err.count("\n") == 1, err
