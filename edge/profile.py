"""Latency and memory of exported models on this device, the way llama-bench measures them.

Each export folder is measured in a fresh worker process (``python -m parscale_edge.profile --worker``), so
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def proc_status_mib(field: str) -> float | None:
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


def time_request(rt, prompts: list[list[int]], gen_len: int) -> dict:
    """One greedy request through :class:`parscale_edge.runtime.OnnxCausalLM`: a timed prefill of ``prompts``,
    then ``gen_len`` decode steps, each timed alone (the argmax stays outside the timing).

    Returns ``{"prefill_ms": float, "decode_ms": [float] * gen_len, "kv_bytes": int}`` (ms; the KV
    cache at the end). The profiler and ``bench/`` share this loop."""
    t = time.perf_counter()
    state, logits = rt.prefill(prompts, gen_len + 1)
    prefill_ms = (time.perf_counter() - t) * 1e3
    steps = []
    try:
        for _ in range(gen_len):
            nxt = logits.argmax(-1)
            t = time.perf_counter()
            logits = rt.decode(state, nxt)
            steps.append((time.perf_counter() - t) * 1e3)
        return {"prefill_ms": prefill_ms, "decode_ms": steps, "kv_bytes": state.cache.nbytes}
    finally:
        state.close()


def decode_read_bytes(folder: str | os.PathLike) -> int:
    """Weight bytes one decode step reads: every external initializer except tables that only a
    Gather reads (an untied embedding: one row per token, not the table). A tied fp32 head reads
    the embedding in full (Gemm), so it counts. Falls back to :func:`folder_bytes` when the graph
    records no external lengths."""
    from .validate import read_graph_summary

    g = read_graph_summary(Path(folder) / "model.onnx")
    if not g.external or any(r.length is None for r in g.external):
        return folder_bytes(folder)
    return sum(r.length for r in g.external if g.consumers.get(r.tensor, {"?"}) - {"Gather"})


# ----------------------------------------------------------------------------------- GPU memory
_nvml_ready = False


def gpu_memory_used_mib(index: int = 0) -> float | None:
    """Memory in use on GPU ``index`` (all processes), MiB, from NVML (nvidia-ml-py) or
    ``nvidia-smi --query-gpu=memory.used``; None where neither answers (no NVIDIA GPU)."""
    global _nvml_ready
    try:
        import pynvml

        if not _nvml_ready:
            pynvml.nvmlInit()
            _nvml_ready = True
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used / 2**20
    except Exception:  # noqa: BLE001 - not installed, no driver: try nvidia-smi
        pass
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(index)],
                           capture_output=True, text=True, timeout=10)
        return float(r.stdout.strip().splitlines()[0]) if r.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class PeakSampler:
    """Samples :func:`gpu_memory_used_mib` in a background thread; ``peak`` is the largest value
    seen between ``start()`` and ``stop()`` (MiB; None without a GPU). ``interval_s`` between samples."""

    def __init__(self, interval_s: float = 0.01):
        import threading

        self.interval_s, self.peak = interval_s, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            v = gpu_memory_used_mib()
            if v is None:
                return
            self.peak = v if self.peak is None else max(self.peak, v)
            self._stop.wait(self.interval_s)

    def start(self) -> "PeakSampler":
        import threading

        self.peak = gpu_memory_used_mib()
        if self.peak is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        v = gpu_memory_used_mib()
        if v is not None:
            self.peak = v if self.peak is None else max(self.peak, v)
        return self.peak


def measure_folder(folder: str, batches: list[int], prompt_lens: list[int], gen_len: int, threads: int | None,
                   repeat: int, warmup: int, bandwidth_gbps: float | None, parallel: int | None = None,
                   device: str = "cpu", io_binding: bool | None = None) -> dict:
    """Run inside a worker process: load ``folder`` and time every (batch, prompt_len).

    Returns ``{"load": {...}, "runs": [{...}, ...]}``; each run has prefill/decode timings, its own
    peak RSS (VmHWM reset before it), KV cache bytes at the end and the share of the
    memory-bandwidth limit reached by decode (CPU only). ``parallel``: the P to run a fused folder
    that offers several. Reference graphs on another ``device`` than cpu, with ``io_binding`` or a
    half-precision cache go to :func:`measure_folder_bound` (GPU memory, device-resident cache);
    fused graphs always keep their cache bound (IO binding; on CUDA in device memory) and record
    the same provider, cache dtype and GPU memory fields (``vram_*_mib``) as that function.
    Raises RuntimeError when ``device`` is cuda but the session runs on the CPU."""
    from .manifest import Manifest

    man = Manifest.read(folder)
    if man.graph == "reference" and (device != "cpu" or io_binding or man.cache_dtype != "float32"):
        return measure_folder_bound(folder, batches, prompt_lens, gen_len, threads, repeat, warmup, bandwidth_gbps,
                                    device, io_binding)
    rt, load, on_gpu = _load_for_profile(folder, device, threads, parallel)
    load["io_binding"] = True
    rng = np.random.default_rng(0)

    def make_one(B: int, S: int):
        prompts = rng.integers(0, rt.manifest.vocab_size, (B, S)).tolist()

        def one() -> tuple[float, list[float], int]:
            r = time_request(rt, prompts, gen_len)
            return r["prefill_ms"], r["decode_ms"], r["kv_bytes"]
        return one

    runs = _time_runs(make_one, batches, prompt_lens, gen_len, repeat, warmup, load, on_gpu,
                      decode_read_bytes(folder), bandwidth_gbps)
    return {"load": load, "runs": runs}


def _load_for_profile(folder: str, device: str, threads: int | None, parallel: int | None = None):
    """(runtime, load fields, on_gpu): ``folder`` loaded into an :class:`parscale_edge.runtime.OnnxCausalLM`
    with the load measured: time (ms), RSS before / peak while loading and, relative to RSS after
    importing onnxruntime, the session's own increase and its ratio to the file size (file MiB:
    model.onnx and its data plus this P's ParScale part file), provider, cache dtype, GPU memory
    before / after loading. Raises RuntimeError when ``device`` is cuda but the session runs on the CPU."""
    rss_before = proc_status_mib("VmRSS")
    import onnxruntime  # noqa: F401 - imported before the session so that the load increase is the session's own

    from .providers import CUDA
    from .runtime import OnnxCausalLM

    rss_imported = proc_status_mib("VmRSS")
    vram_before = gpu_memory_used_mib() if device != "cpu" else None
    t0 = time.perf_counter()
    rt = OnnxCausalLM(folder, device=device, threads=threads, parallel=parallel)
    load_ms = (time.perf_counter() - t0) * 1e3
    peak_load = proc_status_mib("VmHWM")
    provider = rt.session.get_providers()[0]
    if device == "cuda" and provider != CUDA:
        raise RuntimeError(f"--device cuda was asked for, but the session runs on {provider}")
    on_gpu = provider == CUDA
    part = rt.manifest.part_file(rt.P)
    file_mib = (folder_bytes(folder) + (Path(folder, part).stat().st_size if part else 0)) / 2**20
    load = {"load_ms": load_ms, "rss_before_mib": rss_before, "peak_rss_load_mib": peak_load,
            "file_mib": file_mib, "P": rt.P, "precision": rt.manifest.precision,
            "cache_dtype": rt.manifest.cache_dtype, "provider": provider,
            "vram_before_mib": vram_before, "vram_loaded_mib": gpu_memory_used_mib() if on_gpu else None}
    if peak_load is not None and rss_imported is not None:
        # Memory at load (issue 8, row 10): the session's own peak, as a multiple of the weight file.
        load["load_rss_increase_mib"] = peak_load - rss_imported
        load["load_rss_ratio"] = load["load_rss_increase_mib"] / file_mib if file_mib else None
    return rt, load, on_gpu


def _time_runs(make_one, batches: list[int], prompt_lens: list[int], gen_len: int, repeat: int, warmup: int,
               load: dict, on_gpu: bool, weight_bytes: int, bandwidth_gbps: float | None) -> list[dict]:
    """Time ``make_one(B, S)()`` -> (prefill ms, decode step ms list, KV bytes) for every batch and
    prompt length: warm-up runs, then ``repeat`` runs with this run's own peak RSS (and GPU memory);
    one row each. Sets ``load["steady_rss_mib"]`` after the first warm-up."""
    runs = []
    for B in batches:
        for S in prompt_lens:
            one = make_one(B, S)
            for _ in range(warmup):
                one()
            if "steady_rss_mib" not in load:  # after the first warm-up: weights paged in, arenas sized
                load["steady_rss_mib"] = proc_status_mib("VmRSS")
            pres, steps, kv = [], [], 0
            _reset_peak_rss()  # so the peak below belongs to this batch size and prompt length
            sampler = PeakSampler().start() if on_gpu else None
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
                   "peak_rss_mib": proc_status_mib("VmHWM"),
                   "vram_peak_mib": sampler.stop() if sampler else None}
            if bandwidth_gbps and not on_gpu:  # the host's bandwidth says nothing about a GPU
                run["bandwidth_share"] = (weight_bytes + kv_mid) / (d50 / 1e3) / (bandwidth_gbps * 1e9)
            runs.append(run)
    load.setdefault("steady_rss_mib", proc_status_mib("VmRSS"))
    return runs


def measure_folder_bound(folder: str, batches: list[int], prompt_lens: list[int], gen_len: int,
                         threads: int | None, repeat: int, warmup: int, bandwidth_gbps: float | None,
                         device: str = "cpu", io_binding: bool | None = None) -> dict:
    """:func:`measure_folder` for reference graphs on a GPU or with a half-precision cache: each
    step is one :meth:`parscale_edge.runtime.OnnxCausalLM.forward` call (only the graph call is
    timed, as in :func:`time_request`), with a :class:`parscale_edge.kv_cache.KVCache` of OrtValues
    under IO binding, so the cache can stay on the device and be fp16/bf16.

    ``io_binding`` None: on for CUDA and for bfloat16 caches, off on the CPU (numpy arrays, plain
    ``session.run``). Returns ``{"load": {...}, "runs": [{...}, ...]}``; each run has
    prefill/decode timings, its own peak RSS (VmHWM reset before it), on a GPU the device memory in
    use before loading / after loading / at its peak (``vram_*_mib``, whole GPU, from
    :func:`gpu_memory_used_mib`), KV cache bytes at the end and the share of the memory-bandwidth
    limit reached by decode. Raises RuntimeError when ``device`` is cuda but the session runs on the CPU."""
    from .kv_cache import KVCache

    rt, load, on_gpu = _load_for_profile(folder, device, threads)
    if io_binding is None:
        io_binding = on_gpu or rt.manifest.cache_dtype == "bfloat16"
    load["io_binding"] = io_binding
    rng = np.random.default_rng(0)

    def make_one(B: int, S: int):
        ids = rng.integers(0, rt.manifest.vocab_size, (B, S)).astype(np.int64)
        pos = np.arange(S, dtype=np.int64)[None].repeat(B, 0)

        def one() -> tuple[float, list[float], int]:
            cache = KVCache.empty(rt.manifest, B, ort_values=io_binding)
            t = time.perf_counter()
            logits, present = rt.forward(ids, np.ones((B, S), np.int64), pos, cache.tensors)
            pre = (time.perf_counter() - t) * 1e3
            cache.advance(present)
            nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            steps = []
            for i in range(gen_len):
                T = S + i + 1
                t = time.perf_counter()
                logits, present = rt.forward(nxt, np.ones((B, T), np.int64), np.full((B, 1), T - 1, np.int64),
                                             cache.tensors)
                steps.append((time.perf_counter() - t) * 1e3)
                cache.advance(present)
                nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            return pre, steps, cache.nbytes
        return one

    runs = _time_runs(make_one, batches, prompt_lens, gen_len, repeat, warmup, load, on_gpu,
                      decode_read_bytes(folder), bandwidth_gbps)
    return {"load": load, "runs": runs}


def profile_folder(folder: str | os.PathLike, batches: list[int], prompt_lens: list[int], gen_len: int,
                   threads: int | None = None, repeat: int = 3, warmup: int = 1,
                   bandwidth_gbps: float | None = None, timeout_s: float = 3600, device: str = "cpu",
                   io_binding: bool | None = None, parallel: int | None = None) -> list[dict]:
    """Measure one export folder in a fresh process on ``device`` (auto, cpu, cuda); one flat row
    per (batch, prompt_len) (see :func:`measure_folder`). ``parallel``: the P to run a fused folder
    that offers several (default: its own).

    ``bandwidth_gbps``: the read bandwidth (GB/s) a CPU run's ``bandwidth_share`` divides by; None
    measures it with the run's thread count (``threads``, else every logical core, ONNX Runtime's
    default; :func:`parscale_edge.device.read_bandwidth_gbps`, cached), so a 2-thread decode is
    compared with what 2 threads can read. Every row records it as ``bandwidth_ref_gbps``.

    Raises RuntimeError with the worker's stderr tail if it fails."""
    if bandwidth_gbps is None and device != "cuda":
        from .device import read_bandwidth_gbps

        bandwidth_gbps = read_bandwidth_gbps(threads or os.cpu_count() or 1)
    args = dict(folder=str(folder), batches=batches, prompt_lens=prompt_lens, gen_len=gen_len, threads=threads,
                repeat=repeat, warmup=warmup, bandwidth_gbps=bandwidth_gbps, device=device, io_binding=io_binding,
                parallel=parallel)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "parscale_edge.profile", "--worker", json.dumps(args)], capture_output=True,
                       text=True, timeout=timeout_s, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"profiling {folder} failed: {r.stderr.strip()[-1500:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return [{**res["load"], **run, "bandwidth_ref_gbps": bandwidth_gbps} for run in res["runs"]]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(measure_folder(**json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m parscale_edge.profile --worker JSON (use `parscale profile`)")


# ------------------------------------------------------------------------------------ orchestration
def quantized_folder(src: Path, precision: str, threads: int | None = None) -> Path:
    """The ``precision`` variant of an fp32 (or fp16) export for cost measurements, made once next to it.

    Every model gets the same structure, so ParScale and its dense twins are compared like for
    like: round-to-nearest, block 32, accuracy_level 4 on every node, no GGUF block reuse (its
    exact-offset correction adds nodes) and no quality checks (cost does not depend on values).
    From an fp16 export the result computes in fp16 (the GPU int4 path); its folder name says so."""
    from .manifest import Manifest

    src = Path(src)
    src_precision = Manifest.read(src).precision
    if precision == src_precision:
        return src
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder

    from .prepare import variant_folder

    out = variant_folder(src, precision, "cost" if src_precision == "fp32" else f"{src_precision}act-cost")
    if not (out / "manifest.json").exists():
        quantize_folder(src, out, QuantConfig(precision=precision, gguf_blocks=False, accuracy_level=4),
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


def dense_twin_export(spec: str, P: int, law, threads: int | None = None,
                      precision: str = "fp32") -> tuple[Path, dict]:
    """Export (cached) a random-weight dense model of the family of ``spec`` with the non-embedding
    size the scaling law ``law`` equates with ``spec`` at P streams, in ``precision`` fp32, fp16 or
    bf16, as the graph ``export_model`` picks (fused where it can run, like the ParScale model it is
    compared with). Returns (folder, description)."""
    from .prepare import export_cache_folder, load_for_export

    base = load_for_export(spec, None, threads, progress=False)
    cfg = base.model.config
    N = non_embedding_params(cfg)
    target = law.equivalent_dense_params(N, P)
    twin = dense_twin_config(cfg, target)
    info = {"base_non_embedding_params": N, "P": P, "target_params": target, "layers": twin.num_hidden_layers,
            "twin_non_embedding_params": non_embedding_params(twin), "weights": "random (cost does not depend on values)"}
    out = export_cache_folder(spec, None, precision, variant=f"dense-twin-L{twin.num_hidden_layers}")
    from .manifest import FORMAT_VERSION, Manifest

    if not (out / "manifest.json").exists() or Manifest.read(out).format_version != FORMAT_VERSION:
        from parscale_edge.export import export_model

        lm = random_model(twin, f"random dense twin of {spec} ({twin.num_hidden_layers} layers)", {"dense_twin": info})
        lm.tokenizer = base.tokenizer
        export_model(lm, out, overwrite=True, precision=precision)  # the graph ensure_export picks for the model
    return out, info


def random_model(cfg, source: str, notes: dict | None = None, seed: int = 0):
    """A :class:`parscale_edge.loading.LoadedModel` of architecture ``cfg`` with random weights, for cost
    measurements (time and memory do not depend on weight values): every tensor N(0, 0.02), norm
    weights 1, ParScale prefixes and aggregator included. No tokenizer. Needs torch."""
    import torch

    from .loading import LoadedModel
    from .model import ParScaleForCausalLM

    torch.manual_seed(seed)
    model = ParScaleForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return LoadedModel(model.eval(), None, source, "0" * 64, {}, dict(notes or {}))


def _ratio(dense: float, parscale: float) -> float | None:
    """dense increase / ParScale increase; None when either is not positive (within noise, the
    ratio means nothing)."""
    return dense / parscale if dense > 0 and parscale > 0 else None


def memory_mib(row: dict, memory: str = "rss") -> float:
    """Memory a profiled model used, MiB: ``rss`` = peak RSS while decoding minus RSS before
    loading; ``vram`` = peak GPU memory in use minus GPU memory in use before loading.
    Raises ValueError for another kind, KeyError/TypeError when the row lacks it."""
    if memory == "rss":
        return row["peak_rss_mib"] - row["rss_before_mib"]
    if memory == "vram":
        return row["vram_peak_mib"] - row["vram_before_mib"]
    raise ValueError(f"memory is rss or vram, got {memory!r}")


def versus_dense_summary(rows: list[dict], memory: str = "rss") -> list[dict]:
    """The paper's comparison (Sec. 4, Fig. 4): increase over P=1 of memory and latency for P
    streams and for the dense model of equal predicted loss, and their ratios, per batch/precision.

    memory: see :func:`memory_mib` (``rss`` on a CPU, ``vram`` on a GPU), MiB; latency = TTFT +
    gen_len decode steps (ms), prompt length = the first one profiled."""
    out = []
    keys = {(r["precision"], r["batch"], r["prompt_len"]) for r in rows}
    for prec, B, S in sorted(keys):
        sel = [r for r in rows if (r["precision"], r["batch"], r["prompt_len"]) == (prec, B, S)]
        base = [r for r in sel if r["kind"] == "parscale" and r["P"] == 1]
        if not base:
            continue
        b = base[0]
        mem = lambda r: memory_mib(r, memory)  # noqa: E731
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


# ----------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class ProfileJob:
    """One export folder to measure: ``model`` as given, ``kind`` ``parscale`` (the model at P
    streams) or ``dense`` (its random-weight dense twin of the scaling law's equivalent size for
    that P), ``parallel`` the P to run a fused export folder at (None: the folder's own), ``extra``
    fields added to each of its rows (a twin's ``dense_layers``, ``dense_params``, ``target_params``)."""

    model: str
    kind: str
    P: int
    folder: Path
    parallel: int | None = None
    extra: dict = field(default_factory=dict)


def plan_profile(models: list[str], parallel: list[int], precisions: list[str], threads: int | None = None,
                 versus_dense: bool = False, law: str = "stack-v2-python", progress: bool = True) -> list[ProfileJob]:
    """The folders ``parscale profile`` measures, exported and quantized (cached) as needed.

    An export folder runs at each P in ``parallel`` it offers (else its own P), as it is. Any
    other model is prepared at every P and precision (fp32/fp16/bf16 exports; int8/int4 the
    cost-only quantization of the fp32 export, :func:`quantized_folder`), and with
    ``versus_dense`` also gets, per P > 1, the dense twin of the ``law``'s equivalent size
    (:data:`parscale_edge.scaling_law.PAPER`), one export per float precision. Raises what
    :func:`parscale_edge.prepare.ensure_export` raises."""
    from .manifest import Manifest
    from .prepare import FLOAT_PRECISIONS, ensure_export, is_export_folder

    jobs = []
    for model in models:
        if is_export_folder(model):
            man = Manifest.read(model)
            offered = man.parallel_choices()
            for P in [P for P in parallel if P in offered] or [man.parscale_n]:
                jobs.append(ProfileJob(model, "parscale", P, Path(model), parallel=P))
            continue
        for P in parallel:
            for prec in precisions:
                if prec in FLOAT_PRECISIONS:
                    folder = ensure_export(model, P, threads, progress=progress, precision=prec)
                else:
                    folder = quantized_folder(ensure_export(model, P, threads, progress=progress), prec, threads)
                jobs.append(ProfileJob(model, "parscale", P, folder))
        if versus_dense:
            from .scaling_law import PAPER

            for P in parallel:
                if P == 1:
                    continue
                twins: dict[str, tuple] = {}  # one export per float precision; int4/int8 quantize the fp32 one
                for prec in precisions:
                    base_prec = prec if prec in FLOAT_PRECISIONS else "fp32"
                    if base_prec not in twins:
                        twins[base_prec] = dense_twin_export(model, P, PAPER[law], threads, precision=base_prec)
                    twin, desc = twins[base_prec]
                    folder = twin if prec in FLOAT_PRECISIONS else quantized_folder(twin, prec, threads)
                    jobs.append(ProfileJob(model, "dense", P, folder,
                                           extra={"dense_layers": desc["layers"],
                                                  "dense_params": desc["twin_non_embedding_params"],
                                                  "target_params": desc["target_params"]}))
    return jobs


# ------------------------------------------------------------------------------------------ a run
DENSE_TWIN_NOTE = "dense twins have random weights: cost does not depend on weight values"


def run_profile(jobs: list[ProfileJob], batches: list[int], prompt_lens: list[int], gen_len: int,
                threads: int | None, repeat: int, warmup: int, device: str = "auto", versus_dense: bool = False,
                settings: dict | None = None, progress: bool = True) -> dict:
    """Measure every job of :func:`plan_profile` (:func:`profile_folder` at each batch size and
    prompt length; ``device`` auto, cpu or cuda): ``{"machine": device_info(), "settings": settings
    (how the run was asked for, recorded as given), "rows": one dict per job, batch and prompt length
    (the job's model, kind, P, folder and extra fields added), "versus_dense":
    :func:`versus_dense_summary` of the rows (GPU memory when the rows have it, else RSS; [] unless
    ``versus_dense``), "note": what the twins' numbers mean, or None}``."""
    from tqdm import tqdm

    from .device import device_info

    info = device_info()
    rows = []
    for job in tqdm(jobs, desc="profiling", disable=not progress):
        for r in profile_folder(job.folder, batches, prompt_lens, gen_len, threads, repeat, warmup,
                                device=device, parallel=job.parallel):
            rows.append({"model": job.model, "kind": job.kind, **r, "P": job.P, "folder": str(job.folder), **job.extra})
    on_gpu = any(r.get("vram_peak_mib") is not None for r in rows)
    summary = versus_dense_summary(rows, memory="vram" if on_gpu else "rss") if versus_dense else []
    return {"machine": info, "settings": settings or {}, "rows": rows, "versus_dense": summary,
            "note": DENSE_TWIN_NOTE if versus_dense else None}


def save_profile(result: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write :func:`run_profile`'s ``result`` into the folder ``out`` (made if missing):
    ``profile.json`` (all of it, atomically) and ``profile.csv`` (the rows, columns sorted by name).
    Returns the two paths."""
    import csv

    from .atomic import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "profile.json", result)
    rows = result["rows"]
    with open(out / "profile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    return out / "profile.json", out / "profile.csv"


def save_plots(result: dict, out: str | os.PathLike, title: str) -> list[Path]:
    """The PNGs of :func:`run_profile`'s ``result`` in the folder ``out``: decode time and memory
    against P (:func:`parscale_edge.plots.plot_profile`), and the versus-dense comparison when the
    result has one. Returns their paths; raises ImportError without matplotlib."""
    from .plots import plot_profile, plot_versus_dense

    paths = plot_profile(result["rows"], Path(out), title)
    if result["versus_dense"]:
        paths.append(plot_versus_dense(result["versus_dense"], Path(out), title))
    return paths
