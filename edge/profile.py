"""Latency and memory of exported models on this device, the way llama-bench measures them.

Each export folder is measured in a fresh worker process (``python -m edge.profile --worker``), so
its resident memory is its own: RSS before loading, peak RSS while loading (VmHWM), steady RSS
after a warm-up, and peak RSS while decoding. For every batch size and prompt length the worker
times prefill (TTFT) and each decode step around the ONNX Runtime call only: tokenisation and
sampling (a greedy argmax) are outside the timed region, as in llama-bench's pp/tg.

``load_rss_increase_mib`` is the peak RSS while creating the session minus the RSS with onnxruntime
imported, and ``load_rss_ratio`` that increase over the weight file size (kept under 1.3: 1.26 for
smollm2-135m fp32, where MLAS pre-packs every MatMul weight next to the mapped file).

Units: ms, MiB (2**20 bytes), tokens/s, GB/s (1e9 bytes/s). Decode tokens/s counts every row of
the batch: ``1000 * batch / decode_ms_p50``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _proc_status_mib(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (MiB), None where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the model files (graph + external data) of an export folder."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.startswith("model.onnx"))


def measure_folder(folder: str, batches: list[int], prompt_lens: list[int], gen_len: int, threads: int | None,
                   repeat: int, warmup: int, bandwidth_gbps: float | None, parallel: int | None = None) -> dict:
    """Run inside a worker process: load ``folder`` and time every (batch, prompt_len).

    Returns ``{"load": {...}, "runs": [{...}, ...]}``; each run has prefill/decode timings, its own
    peak RSS (VmHWM reset before it), KV cache bytes at the end and the share of the
    memory-bandwidth limit reached by decode."""
    rss_before = _proc_status_mib("VmRSS")
    import onnxruntime  # noqa: F401 - imported before the session so that the load increase is the session's own

    from .runtime import OnnxCausalLM

    rss_imported = _proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    rt = OnnxCausalLM(folder, device="cpu", threads=threads, parallel=parallel)
    load_ms = (time.perf_counter() - t0) * 1e3
    peak_load = _proc_status_mib("VmHWM")
    file_mib = folder_bytes(folder) / 2**20
    load = {"load_ms": load_ms, "rss_before_mib": rss_before, "peak_rss_load_mib": peak_load,
            "file_mib": file_mib, "P": rt.P, "precision": rt.manifest.precision}
    if peak_load is not None and rss_imported is not None:
        # Memory at load (issue 8, row 10): the session's own peak, as a multiple of the weight file.
        load["load_rss_increase_mib"] = peak_load - rss_imported
        load["load_rss_ratio"] = load["load_rss_increase_mib"] / file_mib if file_mib else None
    man = rt.manifest
    rng = np.random.default_rng(0)
    runs = []
    weight_bytes = folder_bytes(folder)
    for B in batches:
        for S in prompt_lens:
            prompts = rng.integers(0, man.vocab_size, (B, S)).tolist()

            def one() -> tuple[float, list[float], int]:
                t = time.perf_counter()
                state, logits = rt.prefill(prompts, gen_len + 1)
                pre = (time.perf_counter() - t) * 1e3
                steps = []
                for _ in range(gen_len):
                    nxt = logits.argmax(-1)
                    t = time.perf_counter()
                    logits = rt.decode(state, nxt)
                    steps.append((time.perf_counter() - t) * 1e3)
                kv = state.kv_bytes
                state.close()
                return pre, steps, kv

            for _ in range(warmup):
                one()
            if "steady_rss_mib" not in load:  # after the first warm-up: weights paged in, arenas sized
                load["steady_rss_mib"] = _proc_status_mib("VmRSS")
            pres, steps, kv = [], [], 0
            _reset_peak_rss()  # so the peak below belongs to this batch size and prompt length
            for _ in range(repeat):
                p, s, kv = one()
                pres.append(p)
                steps += s
            d50, d90 = float(np.percentile(steps, 50)), float(np.percentile(steps, 90))
            kv_mid = kv * (S + gen_len / 2) / (S + gen_len)
            run = {"batch": B, "prompt_len": S, "gen_len": gen_len, "repeat": repeat,
                   "ttft_ms": float(np.median(pres)), "prefill_tokens_per_s": B * S / float(np.median(pres)) * 1e3,
                   "decode_ms_p50": d50, "decode_ms_p90": d90, "decode_tokens_per_s": 1e3 * B / d50,
                   "kv_cache_mib": kv / 2**20, "latency_ms": float(np.median(pres)) + gen_len * d50,
                   "peak_rss_mib": _proc_status_mib("VmHWM")}
            if bandwidth_gbps:
                run["bandwidth_share"] = (weight_bytes + kv_mid) / (d50 / 1e3) / (bandwidth_gbps * 1e9)
            runs.append(run)
    load.setdefault("steady_rss_mib", _proc_status_mib("VmRSS"))
    return {"load": load, "runs": runs}


def profile_folder(folder: str | os.PathLike, batches: list[int], prompt_lens: list[int], gen_len: int,
                   threads: int | None = None, repeat: int = 3, warmup: int = 1,
                   bandwidth_gbps: float | None = None, timeout_s: float = 3600,
                   parallel: int | None = None) -> list[dict]:
    """Measure one export folder in a fresh process; one flat row per (batch, prompt_len).
    ``parallel``: the P to run a fused folder that offers several (default: its own).

    Raises RuntimeError with the worker's stderr tail if it fails."""
    args = dict(folder=str(folder), batches=batches, prompt_lens=prompt_lens, gen_len=gen_len, threads=threads,
                repeat=repeat, warmup=warmup, bandwidth_gbps=bandwidth_gbps, parallel=parallel)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "edge.profile", "--worker", json.dumps(args)], capture_output=True,
                       text=True, timeout=timeout_s, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"profiling {folder} failed: {r.stderr.strip()[-1500:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return [{**res["load"], **run} for run in res["runs"]]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(measure_folder(**json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m edge.profile --worker JSON (use `parscale profile`)")


# ------------------------------------------------------------------------------------ orchestration
def quantized_folder(fp32: Path, precision: str, threads: int | None = None) -> Path:
    """The ``precision`` variant of an fp32 export for cost measurements, made once next to it.

    Every model gets the same structure, so ParScale and its dense twins are compared like for
    like: round-to-nearest, block 32, accuracy_level 4 on every node, no GGUF block reuse (its
    exact-offset correction adds nodes) and no quality checks (cost does not depend on values)."""
    if precision == "fp32":
        return fp32
    from quant.onnx_quant import QuantConfig, quantize_folder

    out = fp32.with_name(fp32.name.replace("-fp32", "") + f"-{precision}-cost")
    if not (out / "manifest.json").exists():
        quantize_folder(fp32, out, QuantConfig(precision=precision, gguf_blocks=False, accuracy_level=4),
                        overwrite=True, threads=threads, check_positions=0, compare_positions=0)
    return out


def non_embedding_params(cfg) -> int:
    """Non-embedding parameters of a dense decoder (the paper's N): layers + final norm."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    attn = H * q + 2 * H * kv + q * H + ((q + 2 * kv) if cfg.attention_bias else 0)
    per_layer = attn + 3 * H * I + 2 * H
    return cfg.num_hidden_layers * per_layer + H


def dense_twin_config(cfg, target_params: float):
    """Same family and width, more layers: the dense model whose non-embedding size is closest to
    ``target_params`` (cost, not quality, is measured with it: its weights are random)."""
    import dataclasses

    per_layer = (non_embedding_params(cfg) - cfg.hidden_size) / cfg.num_hidden_layers
    layers = max(cfg.num_hidden_layers + 1, round((target_params - cfg.hidden_size) / per_layer))
    return dataclasses.replace(cfg.with_parallel(1), num_hidden_layers=int(layers), extra=dict(cfg.extra))


def dense_twin_export(spec: str, P: int, law, threads: int | None = None) -> tuple[Path, dict]:
    """Export (cached) a random-weight dense model of the family of ``spec`` with the non-embedding
    size the scaling law ``law`` equates with ``spec`` at P streams. Returns (folder, description)."""
    import torch

    from .cli import load_for_export
    from .hub import default_cache_dir
    from .loading import LoadedModel
    from .model import ParScaleForCausalLM

    base = load_for_export(spec, None, threads, progress=False)
    cfg = base.model.config
    N = non_embedding_params(cfg)
    target = law.equivalent_dense_params(N, P)
    twin = dense_twin_config(cfg, target)
    info = {"base_non_embedding_params": N, "P": P, "target_params": target, "layers": twin.num_hidden_layers,
            "twin_non_embedding_params": non_embedding_params(twin), "weights": "random (cost does not depend on values)"}
    key = Path(spec).name if Path(spec).exists() else spec
    out = Path(default_cache_dir()) / "onnx" / f"{key}-dense-twin-L{twin.num_hidden_layers}-fp32"
    from .manifest import FORMAT_VERSION, Manifest

    if not (out / "manifest.json").exists() or Manifest.read(out).format_version != FORMAT_VERSION:
        from export import export_model

        torch.manual_seed(0)
        model = ParScaleForCausalLM(twin)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        lm = LoadedModel(model.eval(), base.tokenizer, f"random dense twin of {spec} ({twin.num_hidden_layers} layers)",
                         "0" * 64, {}, {"dense_twin": info})
        export_model(lm, out, overwrite=True)
    return out, info


def _ratio(dense: float, parscale: float) -> float | None:
    """dense increase / ParScale increase; None when either is not positive (within noise, the
    ratio means nothing)."""
    return dense / parscale if dense > 0 and parscale > 0 else None


def versus_dense_summary(rows: list[dict]) -> list[dict]:
    """The paper's comparison (Sec. 4, Fig. 4): increase over P=1 of memory and latency for P
    streams and for the dense model of equal predicted loss, and their ratios, per batch/precision.

    memory = peak RSS while decoding minus RSS before loading (MiB); latency = TTFT + gen_len
    decode steps (ms), prompt length = the first one profiled."""
    out = []
    keys = {(r["precision"], r["batch"], r["prompt_len"]) for r in rows}
    for prec, B, S in sorted(keys):
        sel = [r for r in rows if (r["precision"], r["batch"], r["prompt_len"]) == (prec, B, S)]
        base = [r for r in sel if r["kind"] == "parscale" and r["P"] == 1]
        if not base:
            continue
        b = base[0]
        mem = lambda r: r["peak_rss_mib"] - r["rss_before_mib"]  # noqa: E731
        for p in sorted({r["P"] for r in sel if r["kind"] == "parscale" and r["P"] > 1}):
            ps = next(r for r in sel if r["kind"] == "parscale" and r["P"] == p)
            dn = next((r for r in sel if r["kind"] == "dense" and r["P"] == p), None)
            if dn is None:
                continue
            row = {"precision": prec, "batch": B, "prompt_len": S, "P": p,
                   "parscale_memory_increase_mib": mem(ps) - mem(b), "dense_memory_increase_mib": mem(dn) - mem(b),
                   "parscale_latency_increase_ms": ps["latency_ms"] - b["latency_ms"],
                   "dense_latency_increase_ms": dn["latency_ms"] - b["latency_ms"],
                   "dense_layers": dn.get("dense_layers")}
            row["memory_ratio"] = _ratio(row["dense_memory_increase_mib"], row["parscale_memory_increase_mib"])
            row["latency_ratio"] = _ratio(row["dense_latency_increase_ms"], row["parscale_latency_increase_ms"])
            out.append(row)
    return out
