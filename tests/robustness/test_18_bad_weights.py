"""Row 18, weights that load but are wrong: NaN/Inf in any backbone tensor (not only the ParScale
prefixes) and integer-typed tensors are refused at load, naming the tensor, instead of exporting
silently (a NaN in model.norm.weight made greedy print an empty line; int8 weights were cast to
float as if they were real values)."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from parscale_edge.cli import main
from parscale_edge.loading import CheckpointError, load_hf_folder, save_hf_folder
from tiny import tiny_model


def damaged(tmp_path, name, change):
    src = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state[name] = change(state[name])
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def cli_refuses(src, tmp_path, capsys, *words):
    capsys.readouterr()
    assert main(["-q", "export", str(src), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["model.norm.weight", "model.layers.1.mlp.down_proj.weight",
                                  "model.embed_tokens.weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_backbone_tensor(tmp_path, name, value, capsys):
    def poison(t):
        t = t.clone()
        t.view(-1)[3] = value
        return t
    src = damaged(tmp_path, name, poison)
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds 1 NaN/Inf value"):
        load_hf_folder(src)
    cli_refuses(src, tmp_path, capsys, name, "NaN/Inf")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8])
def test_integer_weights_are_refused(tmp_path, dtype, capsys):
    src = damaged(tmp_path, "model.layers.0.self_attn.q_proj.weight", lambda t: (t * 100).to(dtype))
    with pytest.raises(CheckpointError, match=rf"q_proj.weight is stored as {str(dtype)[6:]}, not as floating point"):
        load_hf_folder(src)
    cli_refuses(src, tmp_path, capsys, "not as floating point")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_still_load(tmp_path, dtype):
    src = damaged(tmp_path, "model.norm.weight", lambda t: t.to(dtype))
    assert load_hf_folder(src).model is not None
