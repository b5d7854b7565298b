"""Row 3, configs where head_dim != hidden/heads and kv_heads < heads: the first step with an empty
past and later steps run and match PyTorch, and the graph's declared input shapes are what the
runtime feeds."""
import numpy as np
import pytest
import torch

from parscale_edge.kv_cache import KVCache
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.export import export_onnx
from tiny import tiny_model


@pytest.fixture(scope="module", params=[1, 2])
def odd_heads(request, tmp_path_factory):
    # hidden 48, 6 query heads of 16 (6*16 = 96 != 48), 2 KV heads (3 queries per KV head)
    lm = tiny_model("qwen2", request.param, head_dim=16, seed=3)
    cfg = lm.model.config
    assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size and cfg.num_key_value_heads < cfg.num_attention_heads
    out = export_onnx(lm, tmp_path_factory.mktemp("odd") / f"p{request.param}")
    return lm, OnnxCausalLM(out, device="cpu", threads=1)


def test_declared_input_shapes_are_what_the_runtime_feeds(odd_heads):
    lm, rt = odd_heads
    cfg = lm.model.config
    declared = {i.name: i.shape for i in rt.session.get_inputs()}
    assert declared["input_ids"] == ["batch", "sequence"] and declared["position_ids"] == ["batch", "sequence"]
    assert declared["attention_mask"] == ["batch", "total_sequence"]
    for name in rt._past_names:
        assert declared[name] == ["stream_batch", cfg.num_key_value_heads, "past_sequence", cfg.head_dim]
    for B in (1, 3):
        empty = KVCache.empty(rt.manifest, B).tensors
        assert len(empty) == 2 * cfg.num_hidden_layers
        assert all(t.shape == (cfg.parscale_n * B, 2, 0, 16) and t.dtype == np.float32 for t in empty)
    out = {o.name: o.shape for o in rt.session.get_outputs()}
    assert out["present.0.key"] == ["stream_batch", 2, "total_sequence", 16]


def test_empty_past_then_decode_steps_match_pytorch(odd_heads):
    lm, rt = odd_heads
    ids = np.array([[4, 8, 15, 16, 23], [42, 7, 1, 2, 3]])
    B, S = ids.shape
    t = torch.from_numpy
    with torch.no_grad():
        ref, ref_cache = lm.model(t(ids), torch.ones(B, S, dtype=torch.long), torch.arange(S)[None].repeat(B, 1))
    got, past = rt.forward(ids, np.ones((B, S), np.int64), np.arange(S)[None].repeat(B, 0))  # empty past
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=0)
    assert past[0].shape == (lm.model.config.parscale_n * B, 2, S, 16)
    for step in range(4):
        nxt = got[:, -1].argmax(-1)[:, None].astype(np.int64)
        T = S + step + 1
        with torch.no_grad():
            ref, ref_cache = lm.model(t(nxt), torch.ones(B, T, dtype=torch.long), torch.full((B, 1), T - 1), ref_cache)
        got, past = rt.forward(nxt, np.ones((B, T), np.int64), np.full((B, 1), T - 1), past)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(past[-1], ref_cache[-1].numpy(), atol=1e-4, rtol=0)
