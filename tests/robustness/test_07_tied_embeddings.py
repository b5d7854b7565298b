"""Row 7, tied embeddings: embedding and lm_head are shared only when the config says tied and the
stored tensors are equal; a tied checkpoint may store the tensor under either name. (Sharded
checkpoints with the tied tensor under lm_head.weight: tests/test_convert_and_loading.py.)"""
import numpy as np
import onnx
import pytest
import torch

from parscale_edge.loading import CheckpointError, LoadedModel, build_model
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.export import export_onnx
from tiny import tiny_config, tiny_model

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
IDS = torch.tensor([[5, 9, 2, 40, 7]])


def _logits(model):
    with torch.no_grad():
        return model(IDS, torch.ones_like(IDS), torch.arange(5)[None])[0]


def _state(seed=0):
    """A tied model's state dict (embedding only) and an independent head of the same shape."""
    lm = tiny_model("qwen2", 1, tie=True, seed=seed)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    return lm, state, torch.randn_like(state[EMB])


def _big_initializers(folder, cfg):
    g = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return [i.name for i in g.initializer if sorted(i.dims) == sorted([cfg.vocab_size, cfg.hidden_size])]


@pytest.mark.parametrize("names", [(EMB,), (HEAD,), (EMB, HEAD)], ids=["embedding", "lm_head", "both-equal"])
def test_tied_config_and_equal_tensors_share_one_tensor(tmp_path, names):
    lm, state, _ = _state()
    emb = state.pop(EMB)
    state.update({n: emb.clone() for n in names})
    model = build_model(tiny_config("qwen2", 1, tie=True), state)
    assert model.config.tie_word_embeddings and model.lm_head_weight is model.model.embed_tokens.weight
    torch.testing.assert_close(_logits(model), _logits(lm.model), atol=0, rtol=0)
    out = export_onnx(LoadedModel(model, None, "t", "0" * 64, {}), tmp_path / "m")
    assert len(_big_initializers(out, model.config)) == 1  # stored once


def test_tied_config_with_different_tensors_is_untied_with_a_warning(tmp_path):
    lm, state, head = _state()
    state[HEAD] = head
    with pytest.warns(UserWarning, match="lm_head.weight differs from the embedding; keeping them untied"):
        model = build_model(tiny_config("qwen2", 1, tie=True), state)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, head, atol=0, rtol=0)
    with torch.no_grad():  # the logits come from the stored head, not from the embedding
        h = lm.model  # same backbone: recompute the final hidden state through a hook
        cap = {}
        hook = h.model.norm.register_forward_hook(lambda m, a, o: cap.__setitem__("h", o))
        _logits(h)
        hook.remove()
    torch.testing.assert_close(_logits(model), cap["h"] @ head.T, atol=1e-5, rtol=1e-5)
    out = export_onnx(LoadedModel(model, None, "t", "0" * 64, {}), tmp_path / "m")
    assert len(_big_initializers(out, model.config)) == 2
    rt = OnnxCausalLM(out, device="cpu", threads=1)
    got, _ = rt.forward(IDS.numpy(), np.ones((1, 5), np.int64), np.arange(5)[None])
    np.testing.assert_allclose(got, _logits(model).numpy(), atol=1e-4)


def test_untied_config_keeps_two_tensors_and_needs_the_head():
    _, state, head = _state()
    with pytest.raises(CheckpointError, match="tie_word_embeddings=false but there is no lm_head.weight"):
        build_model(tiny_config("qwen2", 1, tie=False), dict(state))
    state[HEAD] = state[EMB].clone()  # equal values, but the config says untied: two parameters
    model = build_model(tiny_config("qwen2", 1, tie=False), state)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
