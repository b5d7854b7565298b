"""The profiler on a tiny export: it runs, and its numbers are self-consistent."""
import json

import pytest

from parscale_edge.profile import dense_twin_config, non_embedding_params, profile_folder, versus_dense_summary
from tiny import tiny_config


def test_profile_rows_are_self_consistent(golden_exports):
    lm, rt = golden_exports["p2_untied"]
    rows = profile_folder(rt.folder, batches=[1, 2], prompt_lens=[5], gen_len=6, threads=1, repeat=2, warmup=1,
                          bandwidth_gbps=10.0)
    assert [(r["batch"], r["prompt_len"]) for r in rows] == [(1, 5), (2, 5)]
    cfg = lm.model.config
    for r in rows:
        assert r["P"] == 2 and r["precision"] == "fp32" and r["gen_len"] == 6
        assert r["decode_ms_p50"] <= r["decode_ms_p90"]
        assert r["decode_tokens_per_s"] == pytest.approx(1000 * r["batch"] / r["decode_ms_p50"])
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch"] * 5 / r["ttft_ms"] * 1000)
        # KV cache at the end: 2 tensors per layer of [P*B, kv_heads, prompt+gen-1 fed tokens... ]
        tokens = 5 + 6
        expect = 2 * cfg.num_hidden_layers * 2 * r["batch"] * cfg.num_key_value_heads * tokens * cfg.head_dim * 4
        assert r["kv_cache_mib"] * 2**20 == pytest.approx(expect)
        assert r["peak_rss_mib"] >= r["steady_rss_mib"] > r["rss_before_mib"] > 0
        assert r["steady_rss_mib"] > r["file_mib"]  # fp32 weights are resident
        assert r["latency_ms"] == pytest.approx(r["ttft_ms"] + 6 * r["decode_ms_p50"])
        assert 0 < r["bandwidth_share"]


def test_dense_twin_matches_the_scaling_law_size():
    cfg = tiny_config("qwen2", 1, num_hidden_layers=4)
    N = non_embedding_params(cfg)
    # the count equals the real parameter count of the model minus the embedding
    from parscale_edge.model import ParScaleForCausalLM

    m = ParScaleForCausalLM(cfg)
    assert N == sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n)
    twin = dense_twin_config(cfg, 1.82 * N)
    assert twin.num_hidden_layers == 7 and twin.parscale_n == 1 and twin.hidden_size == cfg.hidden_size
    assert abs(non_embedding_params(twin) / N - 1.82) < 0.15


def test_versus_dense_summary_ratios():
    base = dict(precision="fp32", batch=1, prompt_len=8, rss_before_mib=10.0)
    rows = [dict(base, kind="parscale", P=1, peak_rss_mib=110.0, latency_ms=100.0),
            dict(base, kind="parscale", P=4, peak_rss_mib=115.0, latency_ms=120.0),
            dict(base, kind="dense", P=4, peak_rss_mib=210.0, latency_ms=200.0, dense_layers=9)]
    (s,) = versus_dense_summary(rows)
    assert (s["parscale_memory_increase_mib"], s["dense_memory_increase_mib"]) == (5.0, 100.0)
    assert s["memory_ratio"] == pytest.approx(20.0) and s["latency_ratio"] == pytest.approx(5.0)


def test_device_info_is_cached(tmp_path, monkeypatch):
    from parscale_edge import device

    calls = []
    monkeypatch.setattr(device, "measure_bandwidth", lambda: calls.append(1) or {"read_gbps": 12.5, "copy_gbps": 20.0,
                                                                                   "array_mib": 1})
    a = device.device_info(tmp_path)
    b = device.device_info(tmp_path)
    assert calls == [1] and a["bandwidth"]["read_gbps"] == b["bandwidth"]["read_gbps"] == 12.5
    assert json.loads((tmp_path / "device-info.json").read_text())["cpu"]["logical_cores"] >= 1


def test_refreshing_device_info_drops_the_per_thread_bandwidth_references(tmp_path, monkeypatch):
    from parscale_edge import device

    monkeypatch.setattr(device, "measure_bandwidth", lambda threads=1: {"read_gbps": 10.0 * threads, "copy_gbps": 1.0,
                                                                          "array_mib": 1, "threads": threads})
    assert device.read_bandwidth_gbps(2, tmp_path) == 20.0
    device.device_info(tmp_path)  # the first measurement: what was cached per thread may be from another run
    assert not (tmp_path / "bandwidth.json").exists()
    monkeypatch.setattr(device, "measure_bandwidth", lambda threads=1: {"read_gbps": 30.0, "copy_gbps": 1.0,
                                                                          "array_mib": 1, "threads": threads})
    assert device.read_bandwidth_gbps(2, tmp_path) == 30.0  # measured again
    device.device_info(tmp_path)  # cached: the per-thread references stay
    assert device.read_bandwidth_gbps(2, tmp_path) == 30.0 and (tmp_path / "bandwidth.json").exists()


def test_a_bandwidth_cached_in_another_boot_is_measured_again(tmp_path, monkeypatch):
    """Cloud VMs with one CPU model string differ in bandwidth: a measurement from another boot (maybe
    another machine) is not reused, by device_info nor by the per-thread references."""
    from parscale_edge import device

    bw = iter([11.0, 33.0, 12.0, 34.0])
    monkeypatch.setattr(device, "measure_bandwidth", lambda threads=1: {"read_gbps": next(bw), "copy_gbps": 1.0,
                                                                          "array_mib": 1, "threads": threads})
    monkeypatch.setattr(device, "boot_id", lambda: "boot-a")
    assert device.device_info(tmp_path)["bandwidth"]["read_gbps"] == 11.0
    assert device.read_bandwidth_gbps(1, tmp_path) == 33.0
    assert device.device_info(tmp_path)["bandwidth"]["read_gbps"] == 11.0  # same boot: cached
    assert device.read_bandwidth_gbps(1, tmp_path) == 33.0
    monkeypatch.setattr(device, "boot_id", lambda: "boot-b")
    info = device.device_info(tmp_path)
    assert info["bandwidth"]["read_gbps"] == 12.0 and info["bandwidth"]["boot_id"] == "boot-b"
    assert device.read_bandwidth_gbps(1, tmp_path) == 34.0


def test_bandwidth_measurement_is_plausible():
    from parscale_edge.device import measure_bandwidth

    bw = measure_bandwidth(size_mib=16, repeat=2)
    assert 0.1 < bw["read_gbps"] < 2000 and 0.1 < bw["copy_gbps"] < 2000


def test_reference_bandwidth_is_measured_with_the_requested_threads_and_cached_per_count(tmp_path, monkeypatch):
    from parscale_edge import device

    real, calls = device.measure_bandwidth, []
    monkeypatch.setattr(device, "measure_bandwidth", lambda threads: calls.append(threads) or
                        {"read_gbps": 10.0 * threads, "copy_gbps": 1.0, "array_mib": 1, "threads": threads})
    assert device.read_bandwidth_gbps(2, tmp_path) == 20.0
    assert device.read_bandwidth_gbps(2, tmp_path) == 20.0  # cached
    assert device.read_bandwidth_gbps(1, tmp_path) == 10.0  # another thread count is measured again
    assert calls == [2, 1]
    assert real(size_mib=4, repeat=1, threads=2)["threads"] == 2
    with pytest.raises(ValueError, match="threads"):
        real(size_mib=4, repeat=1, threads=0)


def test_profile_divides_by_a_bandwidth_of_the_runs_thread_count(monkeypatch):
    """profile_folder measures its reference with the run's threads and hands it to the worker."""
    import subprocess

    from parscale_edge import device, profile

    asked, sent = [], []
    monkeypatch.setattr(device, "read_bandwidth_gbps", lambda threads: asked.append(threads) or 7.5)

    def worker(argv, **kw):
        sent.append(json.loads(argv[-1]))
        return subprocess.CompletedProcess(argv, 0, json.dumps({"load": {}, "runs": [{"batch": 1}]}), "")

    monkeypatch.setattr(profile.subprocess, "run", worker)
    rows = profile_folder("unused", batches=[1], prompt_lens=[4], gen_len=2, threads=2)
    assert asked == [2] and sent[0]["bandwidth_gbps"] == 7.5 and sent[0]["threads"] == 2
    assert rows == [{"batch": 1, "bandwidth_ref_gbps": 7.5}]
    profile_folder("unused", batches=[1], prompt_lens=[4], gen_len=2, threads=2, bandwidth_gbps=3.0)
    assert asked == [2] and sent[1]["bandwidth_gbps"] == 3.0  # a given reference is used as is


def test_decode_read_bytes_skips_gather_only_tables(tmp_path):
    """A tied fp32 head reads the embedding every step (it counts); after int4 quantization the head
    is its own matrix and the fp32 embedding is only gathered (it does not)."""
    from parscale_edge.profile import decode_read_bytes, folder_bytes
    from parscale_edge.export import export_model
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder
    from tiny import tiny_model

    lm = tiny_model("qwen2", P=1, tie=True, seed=3)
    fp32 = export_model(lm, tmp_path / "fp32", graph="fused")
    emb = lm.model.model.embed_tokens.weight.numel() * 4
    assert emb <= decode_read_bytes(fp32) <= folder_bytes(fp32)  # the tied Gemm reads the embedding
    q = quantize_folder(fp32, tmp_path / "q", QuantConfig(precision="int4", block_size=16), check_positions=0,
                        compare_positions=0)
    assert 0 < decode_read_bytes(q) <= folder_bytes(q) - emb  # the fp32 table is only gathered now
