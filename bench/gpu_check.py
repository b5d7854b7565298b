"""GPU check: CUDA accuracy, then the profiler on Qwen2.5-Coder shapes, then the paper's ratios.

Run through ``bench/gpu_check.sh``: it carries onnxruntime-gpu to the GPU machine in parts, unpacks
it into an overlay that shadows the machine's onnxruntime (CPU), and gives this check what is left
of its 7 minutes (its plan is at its top). Subcommands: ``run`` (the check) and ``accuracy`` (step 3
alone). Steps of ``run``, each recorded in ``summary.json``:

  1. environment: GPU (nvidia-smi), onnxruntime version and providers, the CUDA probe; an
     onnxruntime older than :data:`parscale_edge.runtime.FUSED_MIN_ORT` is a one-line error;
  2. golden/export tests with the sessions on CUDA (``PARSCALE_TEST_DEVICE=cuda pytest tests/test_export.py``);
  3. accuracy (``accuracy.json``): the authors' golden models run on the device against CPU fp32:
     the reference graph fp32 (max |logit diff| <= 1e-3), fp16 (top-1 agreement >= 99%) and bf16
     (reported); the fused graph -- what runs on CUDA, whose GroupQueryAttention has fp16/bf16
     kernels only there -- in fp16 (top-1 >= 99%, through the runtime's device-resident cache),
     bf16 (reported), int4 from fused fp16 (top-1 >= 98% against the same int4 on the CPU) and fused
     fp16 with the int8 KV cache (``--kv-cache int8``: top-1 >= 98% against the same on the CPU); ONNX
     Runtime's profiler shows every compute op of fused fp16, int4 and int8-cache on the device's provider; a
     bf16-weighted tiny Qwen2 with massive activations gives no NaN/Inf on 512 tokens in both
     graphs, fp16 and bf16; optionally a real model (``--real-model``, fused fp16) over 1024
     positions of code;
  4. profile (``profile.json``, ``profile.csv``, PNGs): random-weight models with the exact shapes
     of qwen2.5-coder-0.5b at P=1,2,4,8, its scaling-law dense twins at P=2,4,8 and
     qwen2.5-coder-1.5b dense, each fp16 and int4 (MatMulNBits from the fp16 export: fp16
     activations), batch 1 and 8, as the fused graph (``--graph reference`` for the other one):
     TTFT, decode ms/token, GPU memory (nvidia-smi), KV cache; exports run in parallel processes,
     profiles one at a time in fresh processes;
  5. the paper's ratios (``paper_ratios.md``) against the paper's 22x / 6x (bench/paper_ratios.py);
  6. int4 decode ms/step on the CPU at P=1,2,4,8 and 1,2,4,8,16 threads with smollm2-135m's shapes
     (``cpu_threads.json``/``.md``, bench/cpu_threads.py; ``cpu_budget_s`` of the deadline is kept for it).

  A deadline (default 390 s; bench/gpu_check.sh passes what is left of its 7 minutes) bounds the
  whole check: what does not fit is listed as skipped (profiles are ordered so that P=1, P=8 and
  the 1.5b anchor come first). ``--dry-run`` runs the same steps on the CPU with tiny models and
  tiny sizes (bf16 is skipped: the CPU provider has no bfloat16 MatMul; fused fp16 and int4 run on
  the CPU provider) and writes to ``bench/results/gpu_check_dryrun/``.

Weights are random for the profile (time and memory do not depend on values; the GPU machine has
no model files). Units: ms, MiB, tokens/s.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import cpu_threads  # noqa: E402 - bench/cpu_threads.py

#: architectures of the named models as this project loads them from their GGUF files (untied heads)
QWEN = dict(vocab_size=151936, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
            max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=True, family="qwen2",
            parscale_n_tokens=48, parscale_attn_smooth=0.1)
ARCHS = {
    "qwen2.5-coder-0.5b": dict(QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, head_dim=64),
    "qwen2.5-coder-1.5b": dict(QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, head_dim=128),
    # dry run: same family and ratios of sizes, a few MB
    "tiny-0.5b": dict(QWEN, vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, head_dim=16, max_position_embeddings=256, parscale_n_tokens=8),
    "tiny-1.5b": dict(QWEN, vocab_size=512, hidden_size=96, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=6, head_dim=16, max_position_embeddings=256, parscale_n_tokens=8),
}


@dataclasses.dataclass
class Plan:
    """What one check measures."""

    device: str
    model: str  # ParScale model at every P in ``parallel``
    anchor: str  # larger dense model of the same family (interpolation anchor for the ratios)
    parallel: tuple[int, ...] = (1, 2, 4, 8)
    twins: tuple[int, ...] = (2, 4, 8)  # P values whose scaling-law dense twin is measured
    precisions: tuple[str, ...] = ("fp16", "int4")
    graph: str = "fused"  # the graph profiled: fused (GroupQueryAttention, the CUDA path) or reference
    batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 64
    gen_len: int = 32
    repeat: int = 2
    warmup: int = 1
    workers: int = 8
    threads: int | None = None
    deadline_s: float = 390.0  # bench/gpu_check.sh passes what is left of the final command's 7 minutes
    # last step: int4 decode on the CPU by thread count (bench/cpu_threads.py), with this much reserved
    cpu_arch: str = "smollm2-135m"
    cpu_parallel: tuple[int, ...] = (1, 2, 4, 8)
    cpu_threads: tuple[int, ...] = (1, 2, 4, 8, 16)
    cpu_budget_s: float = 90.0


PLANS = {
    "gpu": Plan(device="cuda", model="qwen2.5-coder-0.5b", anchor="qwen2.5-coder-1.5b"),
    "dry": Plan(device="cpu", model="tiny-0.5b", anchor="tiny-1.5b", batches=(1, 2), prompt_len=16, gen_len=8,
                repeat=1, workers=2, threads=1, deadline_s=900.0, cpu_arch="tiny-smollm2",
                cpu_threads=tuple(t for t in (1, 2, 4, 8, 16) if t <= (os.cpu_count() or 1)), cpu_budget_s=60.0),
}


def _log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def ort_too_old() -> str | None:
    """Why this onnxruntime cannot run the fused graph (older than :data:`parscale_edge.runtime.FUSED_MIN_ORT`), or None."""
    import onnxruntime as ort

    from parscale_edge.runtime import FUSED_MIN_ORT, ort_version

    if ort_version(ort.__version__) >= FUSED_MIN_ORT:
        return None
    return (f"onnxruntime {ort.__version__} is older than {'.'.join(map(str, FUSED_MIN_ORT))}, which the fused graph "
            f"needs (on the GPU machine: bench/gpu_check.sh carries onnxruntime-gpu 1.31.1)")


# --------------------------------------------------------------------------------- model building
def arch_config(name: str, P: int = 1, layers: int | None = None):
    """The :class:`parscale_edge.config.ParScaleConfig` of ``ARCHS[name]`` with P streams (or ``layers``)."""
    from parscale_edge.config import ParScaleConfig

    d = dict(ARCHS[name], parscale_n=P)
    if layers:
        d["num_hidden_layers"] = layers
    return ParScaleConfig(**d)


def _export_job(job: dict) -> dict:
    """In a worker process: random-weight export of one model in fp16 as the ``graph`` kind of the
    job (fused: the CUDA path), then int4 from it (MatMulNBits with fp16 activations)."""
    import torch

    torch.set_num_threads(job["torch_threads"])
    from parscale_edge.profile import quantized_folder, random_model
    from parscale_edge.export import export_model

    t0 = time.perf_counter()
    cfg = arch_config(job["arch"], job["streams"], job.get("layers"))
    out = {"fp16": Path(job["dir"]) / f"{job['name']}-{job['graph']}-fp16"}
    if not (out["fp16"] / "manifest.json").exists():
        export_model(random_model(cfg, f"random weights, {job['name']}"), out["fp16"], overwrite=True,
                     graph=job["graph"], precision="fp16")
    t1 = time.perf_counter()
    if "int4" in job["precisions"]:
        out["int4"] = quantized_folder(out["fp16"], "int4", threads=job["torch_threads"])
    return {"name": job["name"], "folders": {k: str(v) for k, v in out.items()}, "export_s": t1 - t0,
            "quantize_s": time.perf_counter() - t1}


def profile_jobs(plan: Plan, work: Path) -> list[dict]:
    """The models of ``plan``, most important first (P=1, P=8, the anchor, ...), each with its
    row labels: kind (parscale / dense twin / dense_anchor), P, non-embedding parameters."""
    from parscale_edge.profile import dense_twin_config, non_embedding_params
    from parscale_edge.scaling_law import PAPER

    law = PAPER["stack-v2-python"]
    base = arch_config(plan.model)
    N = non_embedding_params(base)
    jobs = []
    for P in plan.parallel:
        jobs.append(dict(name=f"{plan.model}-p{P}", arch=plan.model, P=P, streams=P, kind="parscale",
                         model=plan.model, non_embedding_params=N))
    anchor = arch_config(plan.anchor)
    jobs.append(dict(name=f"{plan.anchor}-dense", arch=plan.anchor, P=1, streams=1, kind="dense_anchor",
                     model=plan.anchor, non_embedding_params=non_embedding_params(anchor)))
    for P in plan.twins:
        twin = dense_twin_config(base, law.equivalent_dense_params(N, P))
        jobs.append(dict(name=f"{plan.model}-twin-p{P}-L{twin.num_hidden_layers}", arch=plan.model, P=P, streams=1,
                         kind="dense",
                         layers=twin.num_hidden_layers, model=plan.model, non_embedding_params=non_embedding_params(twin),
                         dense_layers=twin.num_hidden_layers, target_params=law.equivalent_dense_params(N, P)))
    order = {("parscale", 1): 0, ("parscale", max(plan.parallel)): 1, ("dense_anchor", 1): 2,
             ("dense", max(plan.twins, default=0)): 3}
    jobs.sort(key=lambda j: (order.get((j["kind"], j["P"]), 4), j["P"]))
    for j in jobs:
        j.update(dir=str(work), precisions=list(plan.precisions), family=ARCHS[j["arch"]]["family"], graph=plan.graph)
    return jobs


# ------------------------------------------------------------------------------------- accuracy
def _golden_logits(folder: Path, name: str, device: str) -> tuple[list, dict, str]:
    """Run every golden case of ``name`` on ``device``; (logits at compared positions, errors vs the
    authors' logits, provider). Fused graphs run through the runtime's preallocated, IO-bound cache
    (device memory on CUDA), reference graphs through ``OnnxCausalLM.forward`` (a cache of OrtValues,
    IO binding, on CUDA and for bfloat16)."""
    import numpy as np

    from parscale_edge.kv_cache import KVCache
    from parscale_edge.runtime import OnnxCausalLM
    from golden import GOLDEN, fused_forward, run_cases

    rt = OnnxCausalLM(folder, device=device, threads=1)
    provider = rt.session.get_providers()[0]
    on_gpu = provider == "CUDAExecutionProvider"
    if rt.fused:
        step = fused_forward(rt)
    else:
        bound = on_gpu or rt.manifest.cache_dtype == "bfloat16"

        def step(ids, mask, pos, past):
            return rt.forward(ids, mask, pos, past if past is not None else
                              KVCache.empty(rt.manifest, ids.shape[0], ort_values=bound).tensors)
    seen = []

    def fwd(ids, mask, pos, past):
        logits, present = step(ids, mask, pos, past)
        seen.append(np.asarray(logits)[mask[:, -ids.shape[1]:].astype(bool)])
        return logits, present

    errs = run_cases(GOLDEN / name, fwd)
    return seen, errs, provider


#: ops that carry a decoder's compute; each must run on the device's provider (ONNX Runtime puts
#: small shape computations on the CPU on purpose, so those are not checked)
COMPUTE_OPS = ("GroupQueryAttention", "MatMul", "MatMulNBits", "Gemm", "SkipSimplifiedLayerNormalization",
               "SimplifiedLayerNormalization", "QuickGelu", "Softmax")


def node_providers(folder: Path, device: str, trace_dir: Path) -> dict[str, list[str]]:
    """Which execution provider ran each op type of ``folder`` (op type -> sorted providers), from
    ONNX Runtime's profiler over one prefill and two decode steps of the runtime on ``device``."""
    import onnxruntime as ort

    from parscale_edge.runtime import OnnxCausalLM, SamplingConfig

    trace_dir.mkdir(parents=True, exist_ok=True)
    plain = ort.SessionOptions

    class Profiled(plain):  # OnnxCausalLM builds its own options: profile that session only
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            self.profile_file_prefix = str(trace_dir / "ort")

    ort.SessionOptions = Profiled
    try:
        rt = OnnxCausalLM(folder, device=device, threads=1)
    finally:
        ort.SessionOptions = plain
    rt.generate([[5, 6, 7, 8]], SamplingConfig(max_new_tokens=3), eos_token_ids=[])
    trace = json.loads(Path(rt.session.end_profiling()).read_text())
    seen: dict[str, set[str]] = {}
    for e in trace:
        if e.get("cat") == "Node" and "op_name" in e.get("args", {}):
            seen.setdefault(e["args"]["op_name"], set()).add(e["args"].get("provider", "?"))
    return {k: sorted(v) for k, v in sorted(seen.items())}


def accuracy(device: str, work: Path, real_model: str | None) -> dict:
    """Step 3 (see module docstring). Returns a JSON-able dict with ``checks``: name -> {value, limit, ok}."""
    import numpy as np

    from parscale_edge.loading import load_hf_folder
    from parscale_edge.runtime import OnnxCausalLM
    from parscale_edge.export import export_model, export_onnx
    from golden import MODELS, GOLDEN
    from parscale_edge.quant.kv_int8 import quantize_kv_folder
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder
    from tiny import massive_activation_model

    precisions = ["fp32", "fp16"] + (["bf16"] if device == "cuda" else [])
    # the fused graph is what runs on CUDA: its GroupQueryAttention has fp16/bf16 kernels only there
    # fused-kv8: the fused fp16 export with the int8 KV cache (GroupQueryAttention's quantized-cache inputs)
    fused = ["fused-fp16"] + (["fused-bf16"] if device == "cuda" else []) + ["fused-int4", "fused-kv8"]
    expected = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    res: dict = {"device": device, "golden": {}, "checks": {}, "skipped": [], "node_providers": {}}
    if device != "cuda":
        res["skipped"].append("bf16 (reference and fused): the CPU provider has no bfloat16 MatMul (CUDA only)")
    worst32 = 0.0
    agree: dict[str, list] = {}
    for name in MODELS:
        folders = {p: export_onnx(load_hf_folder(GOLDEN / name), work / "golden" / f"{name}-{p}", overwrite=True,
                                  precision=p) for p in precisions}
        ref, ref_errs, _ = _golden_logits(folders["fp32"], name, "cpu")
        ref_all = np.concatenate(ref)
        g = {"cpu_fp32_vs_authors_max_abs": max(ref_errs.values())}
        int4_cpu = kv8_cpu = None
        for key in [*precisions, *fused]:
            try:
                if key.startswith("fused-"):
                    prec = key.split("-")[1]
                    if prec == "int4":  # from the fused fp16 export: MatMulNBits with fp16 activations
                        folders[key] = quantize_folder(folders["fused-fp16"], work / "golden" / f"{name}-{key}",
                                                       QuantConfig(precision="int4", accuracy_level=0),
                                                       overwrite=True, check_positions=0, compare_positions=0)
                        int4_cpu = np.concatenate(_golden_logits(folders[key], name, "cpu")[0])
                    elif prec == "kv8":  # scales calibrated on the CPU from the fp16 cache
                        folders[key] = quantize_kv_folder(folders["fused-fp16"], work / "golden" / f"{name}-{key}",
                                                          overwrite=True, compare_positions=0, threads=1)
                        kv8_cpu = np.concatenate(_golden_logits(folders[key], name, "cpu")[0])
                    else:
                        folders[key] = export_model(load_hf_folder(GOLDEN / name), work / "golden" / f"{name}-{key}",
                                                    overwrite=True, graph="fused", precision=prec)
                got, errs, provider = _golden_logits(folders[key], name, device)
            except Exception as e:  # noqa: BLE001 - e.g. an op without a kernel for this dtype: recorded
                g[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                res["checks"][f"{name} {key} runs on {device}"] = {"value": g[key]["error"][:200], "limit": None,
                                                                   "ok": False}
                continue
            got_all = np.concatenate(got)
            diff = float(np.abs(got_all - ref_all).max())
            top1 = float((got_all.argmax(-1) == ref_all.argmax(-1)).mean())
            g[key] = {"provider": provider, "max_abs_vs_cpu_fp32": diff, "top1_vs_cpu_fp32": top1,
                      "max_abs_vs_authors": max(errs.values()), "positions": int(len(got_all)),
                      "finite": bool(np.isfinite(got_all).all())}
            if device == "cuda" and provider != "CUDAExecutionProvider":
                res["checks"][f"{name} {key} runs on CUDA"] = {"value": provider, "limit": "CUDAExecutionProvider",
                                                                "ok": False}
            if key == "fp32":
                worst32 = max(worst32, diff)
            elif key == "fused-int4":  # rounding to 4 bits is the same on both devices: compare with the CPU's
                top1 = float((got_all.argmax(-1) == int4_cpu.argmax(-1)).mean())
                g[key]["top1_vs_cpu_same_int4"] = top1
            elif key == "fused-kv8":  # the int8 cache's rounding is the same on both devices, too
                top1 = float((got_all.argmax(-1) == kv8_cpu.argmax(-1)).mean())
                g[key]["top1_vs_cpu_same_kv8"] = top1
            agree.setdefault(key, []).append((top1, len(got_all)))
        res["golden"][name] = g
        if name == "p2_untied":  # where each compute op ran (one model is enough: the graphs are alike)
            for key in ("fused-fp16", "fused-int4", "fused-kv8"):
                if key in folders:
                    try:
                        res["node_providers"][key] = placed = node_providers(folders[key], device, work / "traces")
                        off = {op: v for op, v in placed.items() if op in COMPUTE_OPS and v != [expected]}
                        res["checks"][f"{key}: every compute op on {expected}"] = {
                            "value": off or sorted(op for op in placed if op in COMPUTE_OPS), "limit": expected,
                            "ok": not off}
                    except Exception as e:  # noqa: BLE001 - recorded as a failed check
                        res["checks"][f"{key}: every compute op on {expected}"] = {
                            "value": f"{type(e).__name__}: {str(e)[:200]}", "limit": expected, "ok": False}
    pooled = lambda xs: sum(a * n for a, n in xs) / sum(n for _, n in xs) if xs else 0.0  # noqa: E731
    res["checks"]["reference fp32 on device: max |logit - CPU fp32|"] = {"value": worst32, "limit": 1e-3,
                                                                         "ok": worst32 <= 1e-3}
    for key, label, limit in (("fp16", "reference fp16", 0.99), ("fused-fp16", "fused fp16", 0.99),
                              ("bf16", "reference bf16", None), ("fused-bf16", "fused bf16", None)):
        if key in agree:
            v = pooled(agree[key])
            res["checks"][f"{label} on device: top-1 agreement with CPU fp32" + (" (reported)" if limit is None else "")] = {
                "value": v, "limit": limit, "ok": limit is None or v >= limit}
    if "fused-int4" in agree:
        v = pooled(agree["fused-int4"])
        res["checks"]["fused int4 (from fp16) on device: top-1 agreement with the same int4 on CPU"] = {
            "value": v, "limit": 0.98, "ok": v >= 0.98}
    if "fused-kv8" in agree:
        v = pooled(agree["fused-kv8"])
        res["checks"]["fused fp16 with the int8 KV cache on device: top-1 agreement with the same on CPU"] = {
            "value": v, "limit": 0.98, "ok": v >= 0.98}
    # massive activations: no NaN/Inf on a 512-token prompt and one decode step
    from parscale_edge.kv_cache import KVCache

    ids = np.random.default_rng(0).integers(0, 97, (1, 512))
    for graph, p in [("reference", q) for q in precisions[1:]] + [("fused", q) for q in precisions[1:]]:
        name = f"{graph} {p}: bf16-weighted Qwen2 with massive activations, 512 tokens, no NaN/Inf"
        try:
            folder = export_model(massive_activation_model(), work / f"massive-{graph}-{p}", overwrite=True,
                                  graph=graph, precision=p)
            rt = OnnxCausalLM(folder, device=device, threads=1)
            on_gpu = rt.session.get_providers()[0] == "CUDAExecutionProvider"
            if graph == "fused":
                state = rt.new_state(1, 513)
                logits = rt.step(state, ids, None, np.arange(512)[None])
                step = rt.decode(state, logits[:, -1].argmax(-1))
                cache = state.cache.tensors  # numpy on the CPU, device OrtValues on CUDA
            else:
                empty = KVCache.empty(rt.manifest, 1, ort_values=on_gpu or p == "bf16").tensors
                logits, cache = rt.forward(ids, np.ones((1, 512), np.int64), np.arange(512)[None], empty)
                step, cache = rt.forward(logits[:, -1].argmax(-1)[:, None], np.ones((1, 513), np.int64),
                                         np.array([[512]]), cache)
            ok = bool(np.isfinite(logits).all() and np.isfinite(step).all())
            for c in cache:  # a bfloat16 OrtValue cannot be read by numpy: its logits stand for it
                if isinstance(c, np.ndarray) or c.data_type() != "tensor(bfloat16)":
                    ok = ok and bool(np.isfinite(np.asarray(c if isinstance(c, np.ndarray) else c.numpy(),
                                                            np.float32)).all())
            res["checks"][name] = {"value": ok, "limit": True, "ok": ok}
        except Exception as e:  # noqa: BLE001 - recorded as a failed check
            res["checks"][name] = {"value": f"{type(e).__name__}: {str(e)[:200]}", "limit": True, "ok": False}
    if real_model:
        try:
            res["real_model"] = r = _real_model(real_model, device, work)
            res["checks"][f"{real_model} {r['graph']} fp16 on device: top-1 agreement with CPU fp32 "
                          f"({r['positions']} positions)"] = {
                "value": r["top1_agreement"], "limit": 0.99, "ok": r["top1_agreement"] >= 0.99}
        except Exception as e:  # noqa: BLE001 - e.g. the model is not in the cache of an offline machine
            res["checks"][f"{real_model} fp16 on device"] = {"value": f"{type(e).__name__}: {str(e)[:300]}",
                                                              "limit": 0.99, "ok": False}
    res["ok"] = all(c["ok"] for c in res["checks"].values())
    return res


def _real_model(spec: str, device: str, work: Path, graph: str = "fused", positions: int = 1024) -> dict:
    """The fp16 export of ``graph`` on ``device`` against fp32 on the CPU over held-out stdlib code
    (parscale_edge.evaluate.compare). Cached exports of another graph kind (e.g. an fp16 reference export made
    before fused half-precision exports existed) are not used: the right one is exported into ``work``."""
    from parscale_edge.prepare import ensure_export, load_for_export
    from parscale_edge.evaluate import compare, onnx_logits_fn, stdlib_text
    from parscale_edge.manifest import Manifest
    from parscale_edge.runtime import OnnxCausalLM
    from parscale_edge.export import export_model

    folders = {}
    for prec in ("fp32", "fp16"):
        folders[prec] = ensure_export(spec, 1, None, progress=False, precision=prec)
        if Manifest.read(folders[prec]).graph != graph and (prec == "fp16" or graph == "reference"):
            folders[prec] = export_model(load_for_export(spec, 1, None, progress=False), work / f"real-{graph}-{prec}",
                                         overwrite=True, graph=graph, precision=prec)
    ref = OnnxCausalLM(folders["fp32"], device="cpu")
    cand = OnnxCausalLM(folders["fp16"], device=device)
    tokens = ref.tokenizer.encode(stdlib_text())
    r = compare(onnx_logits_fn(ref), onnx_logits_fn(cand), tokens, window=512, max_positions=positions)
    return {"model": spec, "graph": cand.manifest.graph, "provider": cand.session.get_providers()[0], **r}


def cmd_accuracy(a) -> int:
    res = accuracy(a.device, Path(a.work), a.real_model)
    from parscale_edge.atomic import write_json

    write_json(a.out, res)
    return 0


# ------------------------------------------------------------------------------------------ run
def _environment(device: str) -> dict:
    import onnxruntime as ort

    from parscale_edge.device import device_info
    from parscale_edge.providers import cuda_status

    info = device_info()
    works, why = cuda_status()
    env = {"machine": info, "onnxruntime_file": ort.__file__, "cuda_works": works, "cuda_reason": why,
           "python": sys.version.split()[0], "device": device}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    try:
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                       text=True).stdout.strip() or None
    except OSError:
        env["commit"] = None
    return env


def cmd_run(a) -> int:
    from parscale_edge.atomic import write_json

    t_start = time.perf_counter()
    plan = PLANS["dry" if a.dry_run else "gpu"]
    if a.deadline_s:
        plan.deadline_s = a.deadline_s
    if a.workers:
        plan.workers = a.workers
    if a.parallel:
        from parscale_edge.prepare import parse_parallel

        plan.parallel = tuple(parse_parallel(a.parallel))
        plan.twins = tuple(p for p in plan.twins if p in plan.parallel)
        plan.cpu_parallel = tuple(p for p in plan.cpu_parallel if p in plan.parallel)
    if a.cpu_threads is not None:
        plan.cpu_threads = tuple(int(x) for x in a.cpu_threads.split(",") if x)
    if a.graph:
        plan.graph = a.graph
    if a.precisions:
        plan.precisions = tuple(a.precisions.split(","))
        if set(plan.precisions) - {"fp16", "int4"}:
            return _fail(f"--precisions takes fp16 and/or int4, got {a.precisions!r}")
    out = Path(a.output or ROOT / "bench" / "results" / ("gpu_check_dryrun" if a.dry_run else "gpu_check"))
    work = Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    left = lambda: plan.deadline_s - (time.perf_counter() - t_start)  # noqa: E731
    summary: dict = {"plan": dataclasses.asdict(plan), "steps": {}, "skipped": []}

    def step(name: str, t0: float, **kw) -> None:
        summary["steps"][name] = {"seconds": round(time.perf_counter() - t0, 1), **kw}
        _log(f"{name}: {summary['steps'][name]}")

    # 1. environment
    t0 = time.perf_counter()
    too_old = ort_too_old()
    if too_old:
        return _fail(too_old)
    env = _environment(plan.device)
    summary["environment"] = env
    if plan.device == "cuda" and not env["cuda_works"]:
        write_json(out / "summary.json", summary)
        return _fail(f"CUDA does not work here: {env['cuda_reason']}")
    step("environment", t0, cuda_works=env["cuda_works"], onnxruntime=env["machine"]["onnxruntime"])

    # start the exports now: they only need CPUs, and the accuracy steps need the GPU
    jobs = profile_jobs(plan, work / "models")
    pool = cf.ProcessPoolExecutor(max_workers=plan.workers, mp_context=__import__("multiprocessing").get_context("spawn"))
    torch_threads = max(1, (os.cpu_count() or 2) // max(1, plan.workers))
    # the CPU step's model first: small, and its step must not find it missing
    cpu_build = pool.submit(cpu_threads.build, plan.cpu_arch, plan.cpu_parallel, work / "models", torch_threads) \
        if plan.cpu_threads else None
    futures = {pool.submit(_export_job, dict(j, torch_threads=torch_threads)): j for j in jobs}
    t_exports = time.perf_counter()

    # 2. golden/export tests with the sessions on the device
    t0 = time.perf_counter()
    if a.skip_pytest:
        step("pytest", t0, status="skipped (--skip-pytest)")
    else:
        env_t = dict(os.environ, PARSCALE_TEST_DEVICE=plan.device)
        r = _bounded([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_export.py"],
                     left() - plan.cpu_budget_s - 20, cwd=ROOT, env=env_t)
        (out / "pytest.log").write_text(r.stdout[-20000:] + r.stderr[-5000:])
        step("pytest", t0, ok=r.returncode == 0, last_line=(r.stdout.strip().splitlines() or [""])[-1])

    # 3. accuracy (own process: the main process never holds a GPU context, so GPU memory is clean)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__)), "accuracy", "--device", plan.device, "--work", str(work / "accuracy"),
           "--out", str(out / "accuracy.json")] + (["--real-model", a.real_model] if a.real_model else [])
    r = _bounded(cmd, left() - plan.cpu_budget_s - 20)
    if r.returncode == 0:
        acc = json.loads((out / "accuracy.json").read_text())
        step("accuracy", t0, ok=acc["ok"], checks={k: v["value"] for k, v in acc["checks"].items()})
    else:
        acc = {"ok": False, "error": r.stderr.strip()[-2000:]}
        step("accuracy", t0, ok=False, error=acc["error"][-500:])

    # 4. profile: wait for exports (until 60% of the budget), then profile in priority order
    t0 = time.perf_counter()
    built: dict[str, dict] = {}
    try:
        for fut in cf.as_completed(futures, timeout=max(1.0, 0.6 * plan.deadline_s - (time.perf_counter() - t_start))):
            j = futures[fut]
            try:
                built[j["name"]] = fut.result()
            except Exception as e:  # noqa: BLE001 - recorded, the rest goes on
                summary["skipped"].append(f"{j['name']}: export failed: {type(e).__name__}: {str(e)[:300]}")
    except cf.TimeoutError:
        summary["skipped"] += [f"{futures[f]['name']}: export not finished in time" for f in futures if not f.done()]
        for proc in list(getattr(pool, "_processes", {}).values()):  # stop them: they would skew the timings
            proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    step("exports", t_exports, built=len(built), of=len(jobs),
         seconds_each={k: round(v["export_s"] + v["quantize_s"], 1) for k, v in built.items()})

    from parscale_edge.profile import profile_folder

    rows = []
    for j in jobs:
        if j["name"] not in built:
            continue
        for prec in plan.precisions:
            folder = built[j["name"]]["folders"].get(prec)
            if folder is None:
                continue
            if left() < 20 + plan.cpu_budget_s:
                summary["skipped"].append(f"{j['name']} {prec}: profile skipped (deadline)")
                continue
            try:
                got = profile_folder(folder, list(plan.batches), [plan.prompt_len], plan.gen_len, plan.threads,
                                     plan.repeat, plan.warmup, None, timeout_s=max(10.0, left() - plan.cpu_budget_s),
                                     device=plan.device)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                summary["skipped"].append(f"{j['name']} {prec}: profile failed: {str(e)[-300:]}")
                continue
            for r_ in got:
                rows.append({"model": j["model"], "kind": j["kind"], "graph": j["graph"], **r_, "P": j["P"], "folder": folder,
                             "family": j["family"], "non_embedding_params": j["non_embedding_params"],
                             "weights": "random", **{k: j[k] for k in ("dense_layers", "target_params") if k in j}})
    step("profile", t0, rows=len(rows))
    result = {"machine": env["machine"], "settings": {**dataclasses.asdict(plan), "law": "stack-v2-python"},
              "rows": rows, "note": "random weights with the architectures named: cost does not depend on weight values"}
    write_json(out / "profile.json", result)
    _write_csv(out / "profile.csv", rows)
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT / "bench"))
    from paper_ratios import write_report

    gpu = (env["machine"].get("gpu") or [{}])[0].get("name")
    title = f"{plan.model} on {gpu or env['machine']['cpu']['model']} ({plan.device}{', DRY RUN: tiny models' if a.dry_run else ''})"
    ratios = write_report(out / "profile.json", out, title=title)
    try:
        from parscale_edge.plots import plot_profile, plot_versus_dense

        plot_profile([r for r in rows if r["kind"] != "dense_anchor"], out, title)
        twin_rows = [r for r in ratios["rows"] if r["method"] == "twin"]
        if twin_rows:
            plot_versus_dense(twin_rows, out, title)
    except ImportError:
        summary["skipped"].append("plots: matplotlib is not installed")
    step("report", t0, ratio_rows=len(ratios["rows"]))

    # 6. int4 decode on the CPU by thread count (the GPU idle, exports done)
    t0 = time.perf_counter()
    threads_res = _cpu_threads(plan, cpu_build, left, summary["skipped"])
    if threads_res:
        write_json(out / "cpu_threads.json", threads_res)
        (out / "cpu_threads.md").write_text(cpu_threads.markdown(
            threads_res, f"{plan.cpu_arch} (random weights), int4, on {env['machine']['cpu']['model']}"))
    step("cpu_threads", t0, rows=len((threads_res or {}).get("rows", [])), ratios=(threads_res or {}).get("ratios"))

    summary["accuracy_ok"] = acc.get("ok", False)
    summary["pytest_ok"] = summary["steps"]["pytest"].get("ok", True)
    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    summary["ok"] = summary["accuracy_ok"] and summary["pytest_ok"] and bool(rows)
    write_json(out / "summary.json", summary)
    _print_summary(summary, acc, rows, out)
    if threads_res:
        print((out / "cpu_threads.md").read_text())
    if not a.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


def _bounded(cmd: list[str], timeout_s: float, floor_s: float = 30.0, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output, stopped after ``timeout_s`` (at least ``floor_s``):
    then exit status 124 and the reason in stderr, so that the check goes on."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=max(floor_s, timeout_s), **kw)
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        return subprocess.CompletedProcess(cmd, 124, text(e.stdout), text(e.stderr) + f"\nstopped after {e.timeout:.0f} s (deadline)")


def _cpu_threads(plan: Plan, build, left, skipped: list[str]) -> dict | None:
    """Step 6: wait for the CPU model's export, then bench/cpu_threads.measure in what is left."""
    if build is None:
        return None
    try:
        built = build.result(timeout=max(1.0, left() - 10))
    except Exception as e:  # noqa: BLE001 - recorded, the check goes on
        skipped.append(f"cpu threads: export of {plan.cpu_arch} failed or late: {type(e).__name__}: {str(e)[:200]}")
        return None
    res = cpu_threads.measure(built["folder"], plan.cpu_parallel, plan.cpu_threads, budget_s=max(0.0, left() - 5))
    skipped += [f"cpu threads: {s}" for s in res["skipped"]]
    return {"arch": plan.cpu_arch, **built, **res}


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _print_summary(summary: dict, acc: dict, rows: list[dict], out: Path) -> None:
    print(f"GPU check ({summary['plan']['device']}) in {summary['total_seconds']} s: "
          f"{'PASS' if summary['ok'] else 'FAIL'}")
    for k, v in acc.get("checks", {}).items():
        print(f"  {'ok  ' if v['ok'] else 'FAIL'} {k}: {v['value']}" + (f" (limit {v['limit']})" if v["limit"] else ""))
    print("| model | kind | graph | P | precision | batch | TTFT ms | decode ms/token p50 | GPU MiB (+ over before load) "
          "| KV MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        vram = (f"{r['vram_peak_mib'] - r['vram_before_mib']:.0f}" if r.get("vram_peak_mib") is not None
                else f"RSS {r['peak_rss_mib'] - r['rss_before_mib']:.0f}")
        print(f"| {r['model']} | {r['kind']} | {r.get('graph', '')} | {r['P']} | {r['precision']} | {r['batch']} | "
              f"{r['ttft_ms']:.1f} | "
              f"{r['decode_ms_p50']:.2f} | {vram} | {r['kv_cache_mib']:.1f} |")
    for s in summary["skipped"]:
        print(f"  skipped: {s}")
    print(f"results: {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("accuracy", help="(step 3 alone) golden/massive-activation checks on a device")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--real-model", default=None)
    p.set_defaults(func=cmd_accuracy)
    p = sub.add_parser("run", help="the whole check")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models and sizes")
    p.add_argument("-o", "--output", default=None)
    p.add_argument("--work", default="/tmp/parscale-gpu-check-work", help="exports (deleted at the end)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--deadline-s", type=float, default=None, help="budget for all steps (GPU default 390)")
    p.add_argument("--workers", type=int, default=None, help="parallel export processes")
    p.add_argument("--skip-pytest", action="store_true")
    p.add_argument("--parallel", default=None, help="P values (default 1,2,4,8; twins and the CPU step follow)")
    p.add_argument("--cpu-threads", default=None, help="thread counts of the CPU step (default 1,2,4,8,16; '' skips it)")
    p.add_argument("--precisions", default=None, help="fp16,int4 (default both)")
    p.add_argument("--graph", default=None, choices=["fused", "reference"],
                   help="graph to profile (default fused: GroupQueryAttention in fp16, the graph that runs on CUDA)")
    p.add_argument("--real-model", default=None, help="also compare fp16 with fp32 on this model (named or .gguf; "
                   "must be in PARSCALE_EDGE_CACHE or a local file: the GPU machine has no internet)")
    p.set_defaults(func=cmd_run)
    a = ap.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
