"""Dense -> ParScale conversion, the authors' format, and loader errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from parscale_edge.config import ParScaleConfig, UnsupportedModelError
from parscale_edge.loading import CheckpointError, convert_to_parscale, load_hf_folder, save_hf_folder
from tiny import tiny_model


def _logits(model, ids):
    t = torch.tensor(ids)
    with torch.no_grad():
        return model(t, torch.ones_like(t), torch.arange(t.shape[1])[None].expand_as(t))[0]


@pytest.mark.parametrize("family,tie", [("qwen2", True), ("llama", False)])
def test_convert_saves_authors_format_and_reloads_identically(tmp_path, family, tie):
    dense = tiny_model(family, 1, tie)
    conv = convert_to_parscale(dense, 3, n_tokens=5, smooth=0.1)
    out = save_hf_folder(conv, tmp_path / "p3")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["parscale_n"], cfg["parscale_n_tokens"], cfg["parscale_attn_smooth"]) == (3, 5, 0.1)
    if family == "qwen2":
        assert cfg["model_type"] == "qwen2_parscale" and cfg["architectures"] == ["Qwen2ParScaleForCausalLM"]
    state = load_file(str(out / "model.safetensors"))
    assert state["model.layers.1.self_attn.prefix_k"].shape == (3, 2, 5, 16)  # [P, kv_heads, n_tokens, head_dim]
    assert state["model.aggregate_layer.0.weight"].shape == (48, 3 * 48)
    assert state["model.aggregate_layer.2.weight"].shape == (3, 48)
    assert ("lm_head.weight" in state) == (not tie)
    assert all(torch.isfinite(v).all() for v in state.values())
    again = load_hf_folder(out).model
    ids = [[5, 9, 2, 40, 7]]
    torch.testing.assert_close(_logits(again, ids), _logits(conv.model, ids), atol=0, rtol=0)


def test_conversion_starts_uniform_and_near_dense():
    dense = tiny_model("qwen2", 1)
    conv = convert_to_parscale(dense, 4, n_tokens=4)
    ids = torch.tensor([[5, 9, 2, 40, 7, 11]])
    with torch.no_grad():
        w = conv.model.aggregation_weights(ids, torch.ones_like(ids), torch.arange(6)[None])
    assert torch.allclose(w, torch.full_like(w, 0.25))  # uniform stream weights at init
    # every stream has its own prefix (noise breaks the symmetry), all finite
    pk = conv.model.model.layers[0].self_attn.prefix_k
    assert torch.isfinite(pk).all() and not torch.equal(pk[0], pk[1])
    # the same seed gives the same initialisation
    again = convert_to_parscale(dense, 4, n_tokens=4)
    torch.testing.assert_close(again.model.model.layers[1].self_attn.prefix_v,
                               conv.model.model.layers[1].self_attn.prefix_v, atol=0, rtol=0)


def test_convert_refuses_parscale_input_and_p1():
    with pytest.raises(ValueError, match="already has parscale_n=2"):
        convert_to_parscale(tiny_model("qwen2", 2), 4)
    with pytest.raises(ValueError, match=">= 2"):
        convert_to_parscale(tiny_model("qwen2", 1), 1)


def test_p_gt_1_checkpoint_without_prefix_is_refused(tmp_path):
    out = save_hf_folder(convert_to_parscale(tiny_model("qwen2", 1), 2), tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "prefix" not in k}, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="prefix tensors .* are missing.*parscale convert"):
        load_hf_folder(out)


def test_nan_prefix_is_refused(tmp_path):
    out = save_hf_folder(convert_to_parscale(tiny_model("qwen2", 1), 2), tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    state["model.layers.0.self_attn.prefix_k"][0, 0, 0, 0] = float("nan")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_hf_folder(out)


def test_unknown_architecture_is_refused(tmp_path):
    out = save_hf_folder(tiny_model("qwen2", 1), tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'mamba'"):
        load_hf_folder(out)


def test_missing_and_corrupt_weights(tmp_path):
    out = save_hf_folder(tiny_model("llama", 1, tie=False), tmp_path / "m")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf_folder(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_folder(out)
    state = {k: v for k, v in tiny_model("llama", 1, tie=False).model.state_dict().items() if "layers.1.mlp" not in k}
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing from the weight files"):
        load_hf_folder(out)


def test_sharded_checkpoint_and_tied_tensor_under_either_name(tmp_path):
    lm = tiny_model("qwen2", 1, tie=True)
    out = save_hf_folder(lm, tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    emb = state.pop("model.embed_tokens.weight")
    state["lm_head.weight"] = emb  # tied tensor stored under the lm_head name
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(out / f))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    again = load_hf_folder(out).model
    ids = [[1, 2, 3, 4]]
    torch.testing.assert_close(_logits(again, ids), _logits(lm.model, ids), atol=0, rtol=0)


def test_config_without_head_dim_divisibility_needs_explicit_head_dim():
    with pytest.raises(UnsupportedModelError, match="set head_dim"):
        ParScaleConfig(vocab_size=10, hidden_size=50, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=3, num_key_value_heads=1)
