"""Stage-2 training (edge/train.py), adapters (edge/adapter.py) and the data split (edge/corpus.py)
on tiny random-weight models."""
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy

from parscale_edge.adapter import (ADAPTER_FORMAT, AdapterError, apply_adapter, backbone_sha256, is_parscale_tensor,
                          save_adapter)
from parscale_edge.corpus import BlockOrder, is_heldout_module, stdlib_split
from parscale_edge.evaluate import HELDOUT_MODULES
from parscale_edge.loading import convert_to_parscale
from parscale_edge.train import TrainConfig, TrainError, TrainResult, dense_view, lr_at, summary_lines, train
from tiny import tiny_model


def _logits(model, ids):
    ids = torch.as_tensor(ids)
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None].expand_as(ids))[0]


def _pattern_tokens(n, period=7, offset=10, phase=0):
    return ((np.arange(n) + phase) % period + offset).astype(np.int32)


def _cfg(**kw):
    base = dict(parallel=2, steps=6, seq_len=16, batch=2, grad_accum=2, lr=1e-2, warmup_steps=2,
                eval_every=3, eval_positions=60, eval_window=32, checkpoint_every=2)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------ adapters
def test_backbone_sha256_is_the_canonical_definition():
    dense = tiny_model(P=1)
    conv = convert_to_parscale(dense, 2)
    h = hashlib.sha256()
    for name, t in sorted(dense.model.state_dict().items()):
        h.update(name.encode())
        h.update(t.numpy().astype("<f4").tobytes())
    assert backbone_sha256(dense.model) == h.hexdigest() == backbone_sha256(conv.model)
    with torch.no_grad():
        conv.model.model.layers[0].self_attn.prefix_k.add_(1.0)
    assert backbone_sha256(conv.model) == h.hexdigest()  # ParScale parts are not the backbone
    with torch.no_grad():
        dense.model.model.norm.weight[0] += 1e-3
    assert backbone_sha256(dense.model) != h.hexdigest()


def test_adapter_file_holds_exactly_the_parscale_tensors_float32_and_metadata(tmp_path):
    conv = convert_to_parscale(tiny_model(P=1), 2)
    path = save_adapter(conv.model, tmp_path / "a.safetensors", source="tiny")
    arrays = load_numpy(str(path))  # what a numpy-only runtime sees
    cfg = conv.model.config
    expected = {f"model.layers.{i}.self_attn.prefix_{kv}" for i in range(2) for kv in "kv"} | {
        f"model.aggregate_layer.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
    assert set(arrays) == expected
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert arrays["model.layers.1.self_attn.prefix_v"].shape == (2, cfg.num_key_value_heads, 48, cfg.head_dim)
    assert arrays["model.aggregate_layer.0.weight"].shape == (48, 96)
    np.testing.assert_array_equal(arrays["model.layers.0.self_attn.prefix_k"],
                                  conv.model.model.layers[0].self_attn.prefix_k.detach().numpy())
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("format", "parscale_n", "parscale_n_tokens", "num_layers", "backbone_sha256",
                                 "source")} == {
        "format": ADAPTER_FORMAT, "parscale_n": "2", "parscale_n_tokens": "48", "num_layers": "2",
        "backbone_sha256": backbone_sha256(conv.model), "source": "tiny"}


def test_applied_adapter_reproduces_the_trained_models_logits(tmp_path):
    dense = tiny_model(P=1)
    conv = convert_to_parscale(dense, 2)
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training: move every ParScale tensor
        for name, p in conv.model.named_parameters():
            if is_parscale_tensor(name):
                p.add_(torch.randn_like(p) * 0.3)
    path = save_adapter(conv.model, tmp_path / "a.safetensors", source="tiny")
    applied = apply_adapter(tiny_model(P=1), path)
    ids = torch.tensor([[5, 9, 3, 44, 12, 7, 70]])
    assert applied.model.config.parscale_n == 2
    assert torch.equal(_logits(applied.model, ids), _logits(conv.model, ids))
    assert not torch.allclose(_logits(applied.model, ids), _logits(dense.model, ids), atol=1e-3)
    assert applied.notes["backbone_sha256"] == backbone_sha256(dense.model)
    assert applied.notes["converted_to_parallel"] == 2


def test_adapter_for_another_backbone_is_refused_naming_both_hashes(tmp_path):
    conv = convert_to_parscale(tiny_model(P=1, seed=0), 2)
    path = save_adapter(conv.model, tmp_path / "a.safetensors", source="tiny")
    other = tiny_model(P=1, seed=1)
    with pytest.raises(AdapterError) as e:
        apply_adapter(other, path)
    msg = str(e.value)
    assert backbone_sha256(conv.model) in msg and backbone_sha256(other.model) in msg


def test_adapter_with_wrong_layer_count_or_format_is_refused(tmp_path):
    conv = convert_to_parscale(tiny_model(P=1), 2)
    path = save_adapter(conv.model, tmp_path / "a.safetensors", source="tiny")
    with pytest.raises(AdapterError, match="adapter is for 2 layers, the model tiny-qwen2-p1 has 3"):
        apply_adapter(tiny_model(P=1, num_hidden_layers=3), path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "b.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="expected 'parscale-edge-adapter/1'"):
        apply_adapter(tiny_model(P=1), tmp_path / "b.safetensors")


# ---------------------------------------------------------------------------------------- data
def test_stdlib_split_holds_out_the_eval_modules_and_about_five_percent():
    split = stdlib_split()
    rel = lambda ps: {p.relative_to(split.root).as_posix() for p in ps}  # noqa: E731
    train, held = rel(split.train), rel(split.heldout)
    assert set(HELDOUT_MODULES) <= held and not (set(HELDOUT_MODULES) & train)
    assert not (train & held) and len(train) > 300
    extra = held - set(HELDOUT_MODULES)
    assert 0.02 < len(extra) / (len(train) + len(extra)) < 0.09
    for m in sorted(train)[:50] + sorted(extra):  # the documented rule, recomputed
        digest = int(hashlib.sha256(m.encode()).hexdigest()[:8], 16)
        assert is_heldout_module(m) == (digest < 0.05 * 16**8)
    assert not any(part in ("test", "tests", "site-packages") for m in train for part in m.split("/"))


def test_block_order_shards_like_a_distributed_sampler_and_covers_each_epoch():
    order = BlockOrder(np.arange(100 * 4, dtype=np.int32), seq_len=4, seed=1)
    assert order.n_blocks == 100
    single = [order.sample_ids(3, k, 0, 1, 4, 2) for k in range(2)]
    two = [sorted(order.sample_ids(3, k, 0, 2, 2, 2) + order.sample_ids(3, k, 1, 2, 2, 2)) for k in range(2)]
    assert single == two == [[24, 25, 26, 27], [28, 29, 30, 31]]
    assert sorted(order.block_of(g) for g in range(100)) == list(range(100))
    assert [order.block_of(g) for g in range(100)] != [order.block_of(g) for g in range(100, 200)]
    np.testing.assert_array_equal(order.batch(0, 0, 0, 1, 1, 1)[0], np.arange(4) + 4 * order.block_of(0))


def test_lr_schedule_warms_up_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(steps=12, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(12)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 4 / 9)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


# ------------------------------------------------------------------------------------ training
def test_frozen_backbone_training_lowers_heldout_loss_and_leaves_the_backbone_untouched(tmp_path):
    lm = tiny_model(P=1)
    before = backbone_sha256(lm.model)
    r = train(lm, _cfg(steps=30, eval_every=10, lr=3e-2), _pattern_tokens(4000), tmp_path / "run",
              eval_tokens=_pattern_tokens(200, phase=3), progress=False, log=lambda m: None)
    h = r.history
    assert [e["step"] for e in h["evals"]] == [0, 10, 20, 30]
    first, last = h["evals"][0]["perplexity"], h["evals"][-1]["perplexity"]
    assert last < 0.5 * first, (first, last)
    assert h["dense"]["positions"] == h["evals"][0]["positions"] == 60
    hd = lm.model.config.head_dim  # layers * (k, v) * (P * kv_heads * 48 prefix tokens * head_dim) + aggregator
    assert h["tokens_trained"] == 30 * 16 * 2 * 2 and h["trainable_parameters"] == 2 * 2 * (2 * 2 * 48 * hd) + (
        48 * 96 + 48 + 2 * 48 + 2)
    assert (r.adapter.stat().st_mode & 0o044) == 0o044  # not left private (0600) by safetensors
    applied = apply_adapter(tiny_model(P=1), r.adapter)  # the backbone is still the original one
    assert backbone_sha256(applied.model) == before == h["backbone_sha256"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert saved["evals"][-1]["perplexity"] == pytest.approx(last)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    data = np.random.default_rng(0).integers(0, 97, 3000).astype(np.int32)
    ev = np.random.default_rng(1).integers(0, 97, 200).astype(np.int32)
    full = train(tiny_model(P=1), _cfg(), data, tmp_path / "a", eval_tokens=ev, progress=False, log=lambda m: None)
    # "killed" after 5 steps: the last checkpoint is step 4, step 5's work is lost
    killed = train(tiny_model(P=1), _cfg(), data, tmp_path / "b", eval_tokens=ev, progress=False,
                   log=lambda m: None, stop_after=5)
    from safetensors import safe_open

    from parscale_edge.train import _load_checkpoint

    path = tmp_path / "b" / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        fingerprint = json.loads(f.metadata()["checkpoint"])["fingerprint"]
    ck = _load_checkpoint(path, fingerprint)  # safetensors + JSON: nothing to unpickle
    assert ck["step"] == 4 and all(is_parscale_tensor(k) for k in ck["trainable"])  # adapter-sized, no backbone
    assert killed.stopped_early and not (tmp_path / "b" / "history.json").read_text().count('"step": 5,')
    resumed = train(tiny_model(P=1), _cfg(), data, tmp_path / "b", eval_tokens=ev, resume=True, progress=False,
                    log=lambda m: None)
    a, b = load_numpy(str(full.adapter)), load_numpy(str(resumed.adapter))
    init = convert_to_parscale(tiny_model(P=1), 2).model.state_dict()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6)
    assert any(not np.allclose(a[k], init[k].numpy(), atol=1e-4) for k in a)  # it did train
    la = [s["loss"] for s in full.history["steps"]]
    lb = [s["loss"] for s in resumed.history["steps"]]
    assert len(lb) == 6 and np.allclose(la, lb, atol=1e-6)
    assert [e["step"] for e in resumed.history["evals"]] == [0, 3, 6]
    assert len(resumed.history["sessions"]) == 2


def test_resume_with_other_settings_or_into_a_used_folder_is_refused(tmp_path):
    data = np.random.default_rng(0).integers(0, 97, 2000).astype(np.int32)
    train(tiny_model(P=1), _cfg(steps=2), data, tmp_path / "r", progress=False, log=lambda m: None)
    with pytest.raises(TrainError, match="lr was 0.01 in the checkpoint"):
        train(tiny_model(P=1), _cfg(steps=2, lr=2e-2), data, tmp_path / "r", resume=True, progress=False)
    with pytest.raises(TrainError, match="not empty; pass --resume"):
        train(tiny_model(P=1), _cfg(steps=2), data, tmp_path / "r", progress=False)
    with pytest.raises(TrainError, match="no checkpoint.safetensors"):
        train(tiny_model(P=1), _cfg(steps=2), data, tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(ValueError, match="fewer than one block"):
        train(tiny_model(P=1), _cfg(steps=2), data[:10], tmp_path / "short", progress=False)


def test_dense_view_is_the_p1_parent_on_shared_weights_and_keeps_the_backbone_frozen():
    dense = tiny_model(P=1)
    conv = convert_to_parscale(dense, 2)
    for name, p in conv.model.named_parameters():
        p.requires_grad_(is_parscale_tensor(name))
    view = dense_view(conv.model)
    assert not any(p.requires_grad for p in view.parameters())
    applied = apply_adapter(dense, save_adapter(conv.model, Path(tempfile.mkdtemp()) / "a.safetensors", "t"))
    assert not any(p.requires_grad for n, p in conv.model.named_parameters() if not is_parscale_tensor(n))
    assert applied.model.model.norm.weight is dense.model.model.norm.weight
    ids = torch.tensor([[1, 2, 3, 50, 60]])
    assert torch.equal(_logits(view, ids), _logits(dense.model, ids))
    assert view.model.embed_tokens.weight is conv.model.model.embed_tokens.weight


def test_full_training_changes_the_backbone_and_writes_a_loadable_hf_folder(tmp_path):
    from parscale_edge.loading import load_hf_folder

    lm = tiny_model(P=1)
    before = backbone_sha256(lm.model)
    data = np.random.default_rng(0).integers(0, 97, 2000).astype(np.int32)
    r = train(lm, _cfg(steps=3, full=True), data, tmp_path / "full", progress=False, log=lambda m: None)
    assert r.adapter is None and not (tmp_path / "full" / "adapter.safetensors").exists()
    back = load_hf_folder(r.model_dir)
    assert back.model.config.parscale_n == 2 and backbone_sha256(back.model) != before
    assert r.history["trainable_parameters"] == sum(p.numel() for p in back.model.parameters())


def test_summary_lines_of_a_run():
    h = {"tokens_trained": 4096, "train_seconds": 12.4, "sessions": [{"wall_seconds": 10.2}, {"wall_seconds": 5.0}],
         "evals": [{"step": 0, "perplexity": 9.5, "positions": 256}, {"step": 8, "perplexity": 8.25, "positions": 256}],
         "dense": {"perplexity": 9.0}}
    r = TrainResult(8, h, Path("run/adapter.safetensors"), None, False)
    assert summary_lines(r, 2) == [
        "trained 4096 tokens in 15 s wall (12 s in steps) -> run/adapter.safetensors",
        "held-out perplexity (256 positions): dense P=1 9.0000, untrained P=2 9.5000, trained 8.2500"]
    assert summary_lines(TrainResult(8, {**h, "evals": []}, None, Path("run/model"), False), 2) == [
        "trained 4096 tokens in 15 s wall (12 s in steps) -> run/model"]
