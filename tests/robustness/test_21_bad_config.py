"""Row 21, config.json values of the wrong type or range (ParScaleConfig validates every field):
one error line naming the file and the field, exit 2, nothing written; a RoPE scaling without a
type is refused, not ignored; a context beyond MAX_CONTEXT is refused before the export."""
import json

import pytest

from parscale_edge.cli import main
from parscale_edge.config import MAX_CONTEXT, ParScaleConfig, UnsupportedModelError
from parscale_edge.loading import save_hf_folder
from tiny import tiny_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_hf_folder(tiny_model("qwen2", 1), tmp_path_factory.mktemp("cfg") / "good")


CASES = [
    (lambda d: d.update(num_hidden_layers="3"), "num_hidden_layers must be a positive integer, got '3' (str)"),
    (lambda d: d.update(parscale_n="2"), "parscale_n must be a positive integer, got '2' (str)"),
    (lambda d: d.update(num_key_value_heads=0), "num_key_value_heads must be a positive integer, got 0"),
    (lambda d: d.update(hidden_size=-64), "hidden_size must be a positive integer, got -64"),
    (lambda d: d.update(max_position_embeddings=0), "max_position_embeddings must be a positive integer, got 0"),
    (lambda d: d.update(max_position_embeddings=1e8), "max_position_embeddings must be a positive integer, got 100000000.0"),
    (lambda d: d.update(max_position_embeddings=10**8), f"max_position_embeddings must be at most {MAX_CONTEXT}"),
    (lambda d: d.update(rms_norm_eps=-1), "rms_norm_eps must be a positive number, got -1"),
    (lambda d: d.update(rope_theta="1e4"), "rope_theta must be a positive number, got '1e4'"),
    (lambda d: d.update(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    (lambda d: d.update(eos_token_id="2"), "eos_token_id must be a token id or a list of them"),
    (lambda d: d.update(rope_scaling="linear"), "rope_scaling must be an object or null, got 'linear'"),
    (lambda d: d.update(rope_scaling={"factor": 4}), "rope_scaling {'factor': 4} is not supported"),
    (lambda d: d.update(rope_scaling={"type": "linear", "factor": 4}), "is not supported; only plain RoPE"),
    (lambda d: [d], "the config is a JSON list, not an object"),
]


@pytest.mark.parametrize("change,msg", CASES, ids=[c[1][:45] for c in CASES])
def test_bad_config_value_is_one_line(good, tmp_path, change, msg, capsys):
    import shutil

    src = shutil.copytree(good, tmp_path / "src")
    d = json.loads((src / "config.json").read_text())
    new = change(d)
    (src / "config.json").write_text(json.dumps(d if new is None else new))
    with pytest.raises(UnsupportedModelError) as e:
        ParScaleConfig.from_json_file(src / "config.json")
    assert msg in str(e.value) and str(src / "config.json") in str(e.value)
    capsys.readouterr()
    assert main(["-q", "export", str(src), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_plain_and_default_rope_still_load(good):
    d = json.loads((good / "config.json").read_text())
    for rs in (None, {}, {"rope_type": "default"}):
        ParScaleConfig.from_hf_dict({**d, "rope_scaling": rs})
