"""The prefix-tuning control (P=1 with a KV prefix, no aggregator; README "Does ParScale help, or is
it prefix tuning?"): P=1 stays the dense model, the control trains, its adapter round-trips, and its
ONNX exports (fused and reference) match PyTorch."""
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy

from parscale_edge.adapter import AdapterError, apply_adapter, backbone_sha256, save_adapter
from parscale_edge.cli import main
from parscale_edge.loading import convert_to_parscale, load_gguf
from parscale_edge.manifest import Manifest
from parscale_edge.model import ParScaleForCausalLM
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.train import TrainConfig, TrainError, dense_view, train
from parscale_edge.export import export_model
from tiny import tiny_model
from tiny_gguf import write_tiny_gguf

IDS = np.array([[5, 70, 80, 9, 60, 3, 17, 44]], dtype=np.int64)


def _logits(model, ids):
    t = torch.as_tensor(ids)
    with torch.no_grad():
        return model(t, torch.ones_like(t), torch.arange(t.shape[1])[None].expand_as(t))[0]


def _control(seed=0, noise=0.3):
    """A tiny dense model and its prefix-only control with prefixes moved away from the init (a
    stand-in for training, so the prefix visibly changes the logits)."""
    dense = tiny_model(P=1)
    ctl = convert_to_parscale(dense, 1, n_tokens=4, prefix_only=True, seed=seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for layer in ctl.model.model.layers:
            layer.self_attn.prefix_k.add_(torch.randn_like(layer.self_attn.prefix_k) * noise)
            layer.self_attn.prefix_v.add_(torch.randn_like(layer.self_attn.prefix_v) * noise)
    return dense, ctl


def test_p1_is_still_the_dense_model_and_the_control_adds_only_prefixes():
    dense = tiny_model(P=1)
    cfg = dense.model.config
    assert not cfg.parscale_prefix_only and not cfg.has_prefix
    assert "parscale_prefix_only" not in cfg.to_hf_dict()  # dense config.json unchanged
    assert not any("prefix" in k or "aggregate" in k for k in dense.model.state_dict())
    _, ctl = _control()
    c = ctl.model.config
    assert (c.parscale_n, c.parscale_prefix_only, c.has_prefix) == (1, True, True)
    extra = set(ctl.model.state_dict()) - set(dense.model.state_dict())
    assert extra == {f"model.layers.{i}.self_attn.prefix_{kv}" for i in range(2) for kv in "kv"}
    assert ctl.model.model.layers[0].self_attn.prefix_k.shape == (1, c.num_key_value_heads, 4, c.head_dim)
    assert c.with_parallel(1).has_prefix is False  # with_parallel(1) is the dense parent
    assert not any("prefix" in k for k in dense_view(ctl.model).state_dict())
    assert torch.equal(_logits(dense_view(ctl.model), IDS), _logits(dense.model, IDS))
    assert not torch.allclose(_logits(ctl.model, IDS), _logits(dense.model, IDS), atol=1e-3)
    assert backbone_sha256(ctl.model) == backbone_sha256(dense.model)
    with pytest.raises(ValueError, match="parscale_prefix_only needs parscale_n = 1"):
        cfg.with_parallel(2, prefix_only=True)
    with pytest.raises(ValueError, match="prefix_only is the P=1 control"):
        convert_to_parscale(dense, 2, prefix_only=True)
    with pytest.raises(ValueError, match="parallel must be >= 2"):
        convert_to_parscale(dense, 1)


def test_control_init_follows_the_parscale_rule_for_one_stream():
    """Same rule as P>1 (init_parscale): keys at mean score -4 against the calibration queries, values
    2% noise; the control at init stays close to dense, as the P=2 conversion does."""
    dense = tiny_model(P=1)
    ctl = convert_to_parscale(dense, 1, n_tokens=4, prefix_only=True)
    p2 = convert_to_parscale(dense, 2, n_tokens=4)
    k1 = ctl.model.model.layers[0].self_attn.prefix_k[0]
    k2 = p2.model.model.layers[0].self_attn.prefix_k[0]
    # both streams' keys point along the same per-head direction (noise 2%)
    cos = torch.nn.functional.cosine_similarity(k1.mean(1), k2.mean(1), dim=-1)
    assert (cos > 0.99).all(), cos
    assert torch.isfinite(k1).all() and k1.abs().max() > 0


def test_control_adapter_round_trips_and_is_refused_where_it_does_not_fit(tmp_path):
    dense, ctl = _control()
    path = save_adapter(ctl.model, tmp_path / "c.safetensors", source="tiny")
    arrays = load_numpy(str(path))
    assert set(arrays) == {f"model.layers.{i}.self_attn.prefix_{kv}" for i in range(2) for kv in "kv"}
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta["parscale_n"] == "1" and meta["parscale_prefix_only"] == "1" and meta["parscale_n_tokens"] == "4"
    applied = apply_adapter(tiny_model(P=1), path)
    assert applied.model.config.parscale_prefix_only and applied.notes["prefix_only"] is True
    assert torch.equal(_logits(applied.model, IDS), _logits(ctl.model, IDS))
    with pytest.raises(AdapterError, match=r"already has P=2"):
        apply_adapter(convert_to_parscale(dense, 2, n_tokens=4), path)
    # a P=2 adapter does not go onto the control either
    p2 = save_adapter(convert_to_parscale(dense, 2, n_tokens=4).model, tmp_path / "p2.safetensors", source="tiny")
    with pytest.raises(AdapterError, match=r"already has P=1 \(prefix only\)"):
        apply_adapter(applied, p2)
    # parscale_n 1 without the flag is not an adapter
    from safetensors.torch import save_file
    t, m = {k: torch.from_numpy(v) for k, v in arrays.items()}, dict(meta)
    del m["parscale_prefix_only"]
    save_file(t, str(tmp_path / "bad.safetensors"), metadata=m)
    with pytest.raises(AdapterError, match="an adapter needs P >= 2, or P = 1 with parscale_prefix_only"):
        apply_adapter(dense, tmp_path / "bad.safetensors")
    with pytest.raises(AdapterError, match="no ParScale tensors"):
        save_adapter(dense.model, tmp_path / "d.safetensors", source="tiny")


def test_control_training_lowers_heldout_loss_and_leaves_the_backbone_bit_identical(tmp_path):
    lm = tiny_model(P=1)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = TrainConfig(parallel=1, prefix=True, prefix_tokens=4, steps=30, seq_len=16, batch=2, grad_accum=2,
                      lr=3e-2, warmup_steps=2, eval_every=10, eval_positions=60, eval_window=32, checkpoint_every=10)
    tokens = ((np.arange(4000)) % 7 + 10).astype(np.int32)
    held = ((np.arange(200) + 3) % 7 + 10).astype(np.int32)
    r = train(lm, cfg, tokens, tmp_path / "run", eval_tokens=held, progress=False, log=lambda m: None)
    h = r.history
    first, last = h["evals"][0]["perplexity"], h["evals"][-1]["perplexity"]
    assert last < 0.5 * first, (first, last)
    assert last < h["dense"]["perplexity"]
    c = lm.model.config
    assert h["trainable_parameters"] == c.num_hidden_layers * 2 * (1 * c.num_key_value_heads * 4 * c.head_dim)
    assert h["config"]["prefix"] is True and h["config"]["parallel"] == 1
    after = lm.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    applied = apply_adapter(tiny_model(P=1), r.adapter)  # backbone hash checked: still the original
    assert backbone_sha256(applied.model) == h["backbone_sha256"] == backbone_sha256(lm.model)
    # resuming the control needs the same flag
    with pytest.raises(TrainError, match="parallel was 1 in the checkpoint"):
        train(tiny_model(P=1), TrainConfig(**{**cfg.__dict__, "prefix": False, "parallel": 2}), tokens,
              tmp_path / "run", resume=True, progress=False, log=lambda m: None)


@pytest.mark.parametrize("bad,msg", [(dict(parallel=1), "or 1 with --prefix"),
                                     (dict(parallel=2, prefix=True), "--prefix is the P=1 control")])
def test_train_config_refuses_p1_without_prefix_and_prefix_with_p2(bad, msg):
    with pytest.raises(TrainError, match=msg):
        TrainConfig(**bad).validate()


@pytest.mark.parametrize("graph", ["fused", "reference"])
def test_control_onnx_export_matches_pytorch(tmp_path, graph):
    dense, ctl = _control()
    out = export_model(ctl, tmp_path / graph, graph=graph)
    man = Manifest.read(out)
    assert man.parscale_n == 1 and man.parscale_n_tokens == 4 and man.extra["prefix_only"] is True
    rt = OnnxCausalLM(out, device="cpu", threads=1)
    ref = _logits(ctl.model, IDS).numpy()
    np.testing.assert_allclose(rt.score(IDS), ref, atol=1e-4)
    assert np.abs(rt.score(IDS) - _logits(dense.model, IDS).numpy()).max() > 1e-2  # the prefix is used
    # incremental decoding through the cache (the fused graph keeps the prefix in its first slots)
    st, last = rt.prefill([IDS[0, :5].tolist()], 8)
    np.testing.assert_allclose(last[0], ref[0, 4], atol=1e-4)
    for j in range(5, IDS.shape[1]):
        np.testing.assert_allclose(rt.decode(st, IDS[:, j])[0], ref[0, j], atol=1e-4)
    if graph == "fused":
        assert man.parallel_options == {"1": "parscale/p1.safetensors"}
        assert rt.prefix_slots(1) == 4


def test_fused_folder_with_the_control_as_p1_and_a_p2_adapter(tmp_path):
    dense, ctl = _control()
    p2 = convert_to_parscale(dense, 2, n_tokens=4)
    out = export_model(ctl, tmp_path / "f", graph="fused", extra_parallel=[p2])
    rt = OnnxCausalLM(out, device="cpu", threads=1)
    assert Manifest.read(out).parallel_options == {"1": "parscale/p1.safetensors", "2": "parscale/p2.safetensors"}
    np.testing.assert_allclose(rt.score(IDS, parallel=1), _logits(ctl.model, IDS).numpy(), atol=1e-4)
    np.testing.assert_allclose(rt.score(IDS, parallel=2), _logits(p2.model, IDS).numpy(), atol=1e-4)


def test_cli_trains_the_control_and_exports_it(tmp_path, capsys):
    import random

    write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    rng = random.Random(0)
    words = ["hello", "world", "def", "return", "for", "in", "range", "12", "x", "y"]
    (tmp_path / "train.txt").write_text(" ".join(rng.choice(words) for _ in range(2500)))
    (tmp_path / "eval.txt").write_text(" ".join(rng.choice(words) for _ in range(500)))
    args = ["-q", "train", str(tmp_path / "tiny.gguf"), "-P", "1", "--prefix", "--data", str(tmp_path / "train.txt"),
            "--eval", str(tmp_path / "eval.txt"), "-o", str(tmp_path / "run"), "--steps", "4", "--seq-len", "32",
            "--grad-accum", "2", "--prefix-tokens", "4", "--eval-every", "2", "--checkpoint-every", "2",
            "--eval-positions", "100", "--eval-window", "64"]
    assert main(args) == 0
    assert "untrained P=1" in capsys.readouterr().out
    adapter = tmp_path / "run" / "adapter.safetensors"
    exp = tmp_path / "exp"
    assert main(["-q", "export", str(tmp_path / "tiny.gguf"), "--adapter", str(adapter), "-o", str(exp)]) == 0
    man = Manifest.read(exp)
    assert man.parallel_options == {"1": "parscale/p1.safetensors"} and man.extra["prefix_only"] is True
    ref = apply_adapter(load_gguf(tmp_path / "tiny.gguf", progress=False), adapter).model
    assert isinstance(ref, ParScaleForCausalLM) and ref.config.parscale_prefix_only
    ids = IDS[:, :6]
    np.testing.assert_allclose(OnnxCausalLM(exp, device="cpu", threads=1).score(ids), _logits(ref, ids).numpy(),
                               atol=1e-4)


def test_adapter_eval_summary_means_spreads_and_the_control_comparison():
    from bench_script import load_bench

    ae = load_bench("adapter_eval.py")
    rows = [{"kind": "dense", "text": "code", "perplexity": 10.0}]
    for arm, seed, ppl in [("P=1 prefix only", 0, 9.8), ("P=1 prefix only", 1, 9.9), ("P=2", 0, 9.5), ("P=2", 1, 9.6),
                           ("P=4", 0, 9.85)]:
        rows.append({"kind": "adapter", "text": "code", "arm": arm, "seed": seed, "tokens": 100352, "perplexity": ppl})
    s = {r["arm"]: r for r in ae.summarize(rows, ["code"])}
    assert list(s) == ["P=1 prefix only", "P=2", "P=4"]
    assert s["P=1 prefix only"]["perplexity_mean"] == pytest.approx(9.85) and s["P=1 prefix only"]["half_range"] == pytest.approx(0.05)
    assert s["P=2"]["vs_dense"] == pytest.approx(-0.045) and s["P=2"]["vs_control"] == pytest.approx(9.55 / 9.85 - 1)
    assert s["P=2"]["beyond_spread"] is True and s["P=2"]["seeds"] == [0, 1]
    assert s["P=4"]["beyond_spread"] is None  # one seed: no spread to compare
    assert "vs_control" not in s["P=1 prefix only"]


def test_demo_labels_the_adapter_pane_with_the_comparison(tmp_path):
    import json

    from parscale_edge.demo.models import adapter_verdict

    assert adapter_verdict(tmp_path / "missing.json") is None
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"summary": [
        {"arm": "P=1 prefix only", "text": "code", "vs_dense": -0.012},
        {"arm": "P=2", "text": "code", "vs_dense": -0.011, "vs_control": 0.001, "beyond_spread": False},
        {"arm": "P=4", "text": "code", "vs_dense": -0.02, "vs_control": -0.008, "beyond_spread": None}]}))
    assert adapter_verdict(f) == ("held-out code perplexity, trained adapters: prefix tuning (P=1) -1.2% vs dense; "
                                  "P=2 -1.1% vs dense, +0.1% vs prefix tuning (within seed spread); "
                                  "P=4 -2.0% vs dense, -0.8% vs prefix tuning (one seed)")
    f.write_text(json.dumps({"summary": [{"arm": "P=2", "text": "code", "vs_dense": -0.011}]}))
    assert adapter_verdict(f) is None  # no control arm: nothing to say


def test_ensure_export_of_p1_with_a_control_adapter_exports_the_control(tmp_path, monkeypatch):
    from parscale_edge import prepare

    dense, ctl = _control()
    path = save_adapter(ctl.model, tmp_path / "c.safetensors", source="tiny")
    monkeypatch.setattr(prepare, "load_for_export", lambda *a, **k: dense)
    monkeypatch.setattr(prepare, "export_cache_folder", lambda *a, **k: tmp_path / "cache")
    out = prepare.ensure_export("tiny", 1, progress=False, adapters=[str(path)])
    man = Manifest.read(out)
    assert man.parallel_options == {"1": "parscale/p1.safetensors"} and man.extra["prefix_only"] is True


def test_adapter_eval_skips_the_adapter_of_a_run_still_training(tmp_path, capsys):
    import json

    from bench_script import load_bench

    ae = load_bench("adapter_eval.py")
    done, running, shipped = (tmp_path / n for n in ("done", "running", "shipped"))
    for d in (done, running, shipped):
        d.mkdir()
        (d / "adapter.safetensors").write_bytes(b"")
    (done / "history.json").write_text(json.dumps({"tokens_trained": 100352, "evals": []}))
    (running / "history.json").write_text(json.dumps({"evals": []}))  # written at a checkpoint
    got = ae.finished([done / "adapter.safetensors", running / "adapter.safetensors", shipped / "adapter.safetensors"])
    assert got == [done / "adapter.safetensors", shipped / "adapter.safetensors"]
    assert "running/adapter.safetensors: its run is not finished" in capsys.readouterr().err
