"""Peers, side by side in one run: prefill and decode speed of smollm2-135m in llama.cpp,
onnxruntime-genai, optimum (ONNX Runtime), PyTorch eager and our own exports.

Same model (smollm2-135m: the GGUF of ``parscale_edge.hub`` for llama.cpp, the same weights dequantized for
everything else), same prompt (the first 256 tokens of ``parscale_edge.evaluate.stdlib_text()`` with the
model's tokenizer; every runtime is fed these ids), same settings (batch 1, greedy, 128 decode
steps, ``--threads`` intra-op threads, default 1). Timed like ``bench/decode_prefill.py`` and
llama-bench: the prefill is one call over the whole prompt, each decode step one call for one
token; tokenisation and the greedy argmax are outside the timed region wherever the runtime lets
us (onnxruntime-genai's ``generate_next_token`` includes its own argmax).

Every peer runs alone in a child process (a crash or a missing package is reported, the others
still run), one after another, with the machine's load recorded before each. The peers run in
``--rounds`` interleaved rounds (each round runs every peer once, starting one peer later than the
round before), so a slow minute on a shared machine hits every runtime alike; the ratio columns are
the median over rounds of the ratio measured within each round (paired), the tok/s columns pool
every round. Our P=1 fp32 export's prompt logits are compared with optimum's export of the same
weights (max abs difference).

    nice -n 19 .venv-peers/bin/python bench/peers/run.py --threads 1 \
        -o bench/results/peers_smollm2.json

Built artifacts (HF folder, onnxruntime-genai int4 and int8 builds, optimum export) are cached under
``$PARSCALE_EDGE_CACHE/peers``. See bench/peers/README.md for the installs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench")]

MODEL = "smollm2-135m"
#: (name, what it is, precision) in run order.
PEERS = [
    ("llama.cpp", "llama-cpp-python on the GGUF (Q4_1)", "gguf-q4_1"),
    ("ort-genai-int4", "onnxruntime-genai model builder, int4 CPU", "int4"),
    # its int8 build lands at our int4's quality (+0.56% perplexity, top-1 96.9%: bench/peers/quality.py):
    # the equal-quality peer of issue 18
    ("ort-genai-int8", "onnxruntime-genai model builder, int8 CPU", "int8"),
    ("optimum-fp32", "optimum ONNX export, ORTModelForCausalLM", "fp32"),
    ("optimum-graph-fp32", "optimum's model.onnx in a plain InferenceSession", "fp32"),
    ("torch-eager-fp32", "PyTorch eager, our model (parscale_edge.loading)", "fp32"),
    ("ours-fp32", "parscale export P=1, OnnxCausalLM", "fp32"),
    ("ours-int4", "parscale export P=1 int4, OnnxCausalLM", "int4"),
]
OURS = ("ours-fp32", "ours-int4")


# ------------------------------------------------------------------------------------- helpers
def cache_dir() -> Path:
    from parscale_edge.hub import default_cache_dir
    return Path(default_cache_dir())


def peers_dir() -> Path:
    d = cache_dir() / "peers"
    d.mkdir(parents=True, exist_ok=True)
    return d


def folder_mib(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 2**20, 1)
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v
    try:
        return v(dist)
    except PackageNotFoundError:
        return None


def cpu_busy(seconds: float = 2.0) -> float:
    """Cores busy (0..ncpu) over ``seconds``, from /proc/stat (other processes: we sleep meanwhile)."""
    def snap():
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        idle = f[3] + f[4]
        return sum(f[:8]) - idle, sum(f[:8])
    try:
        b0, t0 = snap()
        time.sleep(seconds)
        b1, t1 = snap()
        return round((b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1), 2)
    except OSError:
        return float("nan")


def ours_folder(precision: str) -> Path:
    """Our P=1 export in ``precision``: its folder in the toolkit's cache (parscale_edge.prepare's naming)."""
    from parscale_edge.prepare import export_cache_folder
    return export_cache_folder(MODEL, 1, precision)


def ensure_ours(precision: str, threads: int) -> Path:
    """Our P=1 export: the cached one, else `parscale export` (fp32) / quantize_folder (int4)."""
    from parscale_edge.manifest import FORMAT_VERSION, Manifest
    folder = ours_folder(precision)
    if (folder / "manifest.json").exists() and Manifest.read(folder).format_version == FORMAT_VERSION:
        return folder
    if precision == "fp32":
        from parscale_edge.prepare import ensure_export
        return Path(ensure_export(MODEL, 1, threads, progress=False))
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder
    quantize_folder(ensure_ours("fp32", threads), folder, QuantConfig(precision="int4"), overwrite=True)
    return folder


def prompt_ids(n: int) -> list[int]:
    from parscale_edge.evaluate import stdlib_text
    from parscale_edge.tokenizer import Tokenizer
    ids = Tokenizer.from_dir(ensure_ours("fp32", 1)).encode(stdlib_text())[:n]
    if len(ids) < n:
        raise SystemExit(f"stdlib_text() has only {len(ids)} tokens, need {n}")
    return ids


# ------------------------------------------------------------------------------ preparation
def prepare_hf_folder() -> Path:
    """Our dense model saved as a Hugging Face folder (model_type llama)."""
    out = peers_dir() / f"{MODEL}-hf"
    if (out / "model.safetensors").exists():
        return out
    from parscale_edge.loading import load_model, save_hf_folder
    save_hf_folder(load_model(MODEL, progress=False), out)
    return out


def check_transformers(hf: Path, ids: list[int], threads: int) -> dict:
    """transformers loads the HF folder and agrees with our PyTorch model on the prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from parscale_edge.loading import load_model
    torch.set_num_threads(threads)
    t = torch.tensor([ids])
    with torch.no_grad():
        ref = load_model(MODEL, progress=False).model(t, torch.ones_like(t), torch.arange(len(ids))[None])[0]
        m = AutoModelForCausalLM.from_pretrained(str(hf), torch_dtype=torch.float32)
        got = m(input_ids=t).logits
    return {"transformers": version("transformers"), "class": type(m).__name__,
            "max_abs_logit_diff_vs_ours_torch": float((got - ref).abs().max())}


def builder_python() -> str:
    """Python that runs onnxruntime-genai's builder. The builder (0.18.0) imports classes of the newest
    transformers (Qwen3_5ForConditionalGeneration) while optimum-onnx pins transformers<4.58, so it
    gets its own venv: $PEERS_BUILDER_PYTHON, else .venv-peers/builder (see README), else ours."""
    cand = os.environ.get("PEERS_BUILDER_PYTHON") or str(ROOT / ".venv-peers" / "builder" / "bin" / "python")
    return cand if Path(cand).exists() else sys.executable


def _cached_build(out: Path, build) -> tuple[Path, dict]:
    """Reuse ``out`` if a build finished there; else run ``build(dest, scratch) -> info`` into a
    temporary folder, record ``info`` in peers-build.json and rename it to ``out``. A failed build
    leaves nothing behind."""
    info_path = out / "peers-build.json"
    if info_path.exists():
        return out, json.loads(info_path.read_text())
    tmp = Path(tempfile.mkdtemp(dir=peers_dir(), prefix=f".{out.name}-"))
    try:
        info = build(tmp / "out", tmp / "scratch")
        (tmp / "out" / "peers-build.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "out", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, info


def prepare_ort_genai(hf: Path, precision: str = "int4") -> tuple[Path, dict]:
    """onnxruntime-genai model builder: ``precision`` (int4 or int8), CPU, from the local HF folder
    (its own defaults otherwise)."""
    out = peers_dir() / f"{MODEL}-ortgenai-{precision}"

    def build(dest: Path, scratch: Path) -> dict:
        py = builder_python()
        cmd = [py, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(dest),
               "-p", precision, "-e", "cpu", "-c", str(scratch)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"builder exited {r.returncode}: {(r.stdout + r.stderr)[-1500:]}")
        vers = subprocess.run([py, "-c", "import importlib.metadata as m; print(*(m.version(d) for d in "
                               "('onnxruntime-genai', 'transformers', 'onnx', 'onnx-ir', 'torch')))"],
                              capture_output=True, text=True).stdout.split()
        return {"command": "python " + " ".join(cmd[1:]).replace(str(dest), str(out)).replace(str(scratch), "<tmp>"),
                "builder_python": py, "seconds": round(time.perf_counter() - t0, 1),
                "builder_versions": dict(zip(("onnxruntime-genai", "transformers", "onnx", "onnx-ir", "torch"), vers)),
                "log_tail": "\n".join(ln for ln in (r.stdout + r.stderr).replace("\r", "\n").splitlines()
                                      if ln.strip() and "%|" not in ln and "quantizer [INFO]" not in ln)[-1500:]}

    return _cached_build(out, build)


def prepare_optimum(hf: Path) -> tuple[Path, dict]:
    """optimum's ONNX export (fp32, text-generation-with-past) of the same HF folder."""
    out = peers_dir() / f"{MODEL}-optimum-fp32"

    def build(dest: Path, scratch: Path) -> dict:
        cli = shutil.which("optimum-cli", path=str(Path(sys.executable).parent)) or "optimum-cli"
        cmd = [cli, "export", "onnx", "--model", str(hf), "--task", "text-generation-with-past", str(dest)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not (dest / "model.onnx").exists():
            raise RuntimeError(f"optimum-cli exited {r.returncode}: {(r.stdout + r.stderr)[-1500:]}")
        return {"command": "optimum-cli " + " ".join(cmd[1:]).replace(str(dest), str(out)),
                "seconds": round(time.perf_counter() - t0, 1), "optimum": version("optimum"),
                "optimum-onnx": version("optimum-onnx"), "transformers": version("transformers")}

    return _cached_build(out, build)


# ---------------------------------------------------------------------------------- workers
# Each returns {"runs": [{"prefill_ms", "decode_ms": [...], "tokens": [...]}...], "info": {...}} and may
# save the prompt logits [S, vocab] to ``logits_out``.

def _repeat(one, warm, prompt, gen_len, repeat):
    warm()
    return [one(prompt, gen_len) for _ in range(repeat)]


def _session_options(threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def _onnx_greedy(forward, prompt, gen_len):
    """run_one of bench/decode_prefill.py, plus the greedy tokens (argmax outside the timing)."""
    ids = np.array([prompt], dtype=np.int64)
    t0 = time.perf_counter()
    logits, past = forward(ids, np.ones_like(ids), np.arange(len(prompt), dtype=np.int64)[None], None)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    steps, toks = [], []
    T = len(prompt)
    for _ in range(gen_len):
        nxt = int(logits[0, -1].argmax())
        toks.append(nxt)
        T += 1
        t0 = time.perf_counter()
        logits, past = forward(np.array([[nxt]]), np.ones((1, T), dtype=np.int64), np.array([[T - 1]]), past)
        steps.append((time.perf_counter() - t0) * 1e3)
    return {"prefill_ms": prefill_ms, "decode_ms": steps, "tokens": toks}


def work_ours(precision, prompt, gen_len, repeat, threads, logits_out):
    from decode_prefill import run_one
    from parscale_edge.runtime import OnnxCausalLM
    folder = ensure_ours(precision, threads)
    rt = OnnxCausalLM(folder, device="cpu", threads=threads)
    if logits_out:
        p = np.array([prompt])
        np.save(logits_out, rt.score(p)[0])
    run_one(rt, prompt[:16], 4)  # warm-up, as bench/decode_prefill.py
    runs = [run_one(rt, prompt, gen_len) for _ in range(repeat)]  # the project's own timing loop
    from parscale_edge.runtime import SamplingConfig
    runs[0]["tokens"] = rt.generate([prompt], SamplingConfig(max_new_tokens=gen_len), eos_token_ids=[])[0]
    man = json.loads((folder / "manifest.json").read_text())
    q = man.get("quantization") or {}
    return {"runs": runs, "info": {"folder": str(folder), "model_mib": folder_mib(folder),
                                   "providers": rt.providers, "timing": "bench/decode_prefill.run_one",
                                   "graph": man.get("graph", "reference"),
                                   "quantization": {k: q.get(k) for k in ("block_size", "symmetric", "accuracy_level",
                                                                          "gguf_blocks", "accuracy_check") if k in q}}}


def work_torch(prompt, gen_len, repeat, threads, logits_out):
    import torch

    from parscale_edge.loading import load_model
    torch.set_num_threads(threads)
    model = load_model(MODEL, progress=False).model.eval()

    def forward(ids, mask, pos, past):
        with torch.inference_mode():
            logits, past = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos),
                                 *(() if past is None else (past,)))
        return logits.numpy(), past

    if logits_out:
        p = np.array([prompt])
        np.save(logits_out, forward(p, np.ones_like(p), np.arange(len(prompt))[None], None)[0][0])
    runs = _repeat(lambda p, n: _onnx_greedy(forward, p, n), lambda: _onnx_greedy(forward, prompt[:16], 4),
                   prompt, gen_len, repeat)
    mib = round(sum(t.numel() * t.element_size() for t in model.parameters()) / 2**20, 1)  # tied: once
    return {"runs": runs, "info": {"torch": torch.__version__, "threads": torch.get_num_threads(), "model_mib": mib,
                                   "mode": "inference_mode, fp32, past_key_values"}}


def work_optimum(prompt, gen_len, repeat, threads, logits_out, plain_session=False):
    folder, build = prepare_optimum(prepare_hf_folder())
    if plain_session:
        import onnxruntime as ort
        sess = ort.InferenceSession(str(folder / "model.onnx"), _session_options(threads),
                                    providers=["CPUExecutionProvider"])
        in_names = [i.name for i in sess.get_inputs()]
        past_names = [n for n in in_names if n.startswith("past_key_values")]
        out_names = [o.name for o in sess.get_outputs()]
        L2 = len(past_names)
        hcfg = json.loads((folder / "config.json").read_text())
        heads = hcfg.get("num_key_value_heads") or hcfg["num_attention_heads"]
        hd = hcfg.get("head_dim") or hcfg["hidden_size"] // hcfg["num_attention_heads"]

        def forward(ids, mask, pos, past):
            if past is None:
                past = [np.zeros((1, heads, 0, hd), np.float32)] * L2
            feed = {"input_ids": ids, "attention_mask": mask}
            if "position_ids" in in_names:
                feed["position_ids"] = pos
            feed.update(zip(past_names, past))
            out = sess.run(out_names, feed)
            return out[0], out[1:]
        info = {"session": "onnxruntime.InferenceSession, numpy feeds", "inputs": in_names[:4] + ["..."]}
    else:
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM
        torch.set_num_threads(threads)
        model = ORTModelForCausalLM.from_pretrained(str(folder), provider="CPUExecutionProvider",
                                                    session_options=_session_options(threads), use_cache=True,
                                                    use_io_binding=False)

        def forward(ids, mask, pos, past):
            with torch.inference_mode():
                o = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          position_ids=torch.from_numpy(pos), past_key_values=past, use_cache=True)
            return o.logits.numpy(), o.past_key_values
        info = {"session": "optimum.onnxruntime.ORTModelForCausalLM (use_io_binding=False)"}
    if logits_out:
        p = np.array([prompt])
        np.save(logits_out, forward(p, np.ones_like(p), np.arange(len(prompt))[None], None)[0][0])
    runs = _repeat(lambda p, n: _onnx_greedy(forward, p, n), lambda: _onnx_greedy(forward, prompt[:16], 4),
                   prompt, gen_len, repeat)
    info.update({"folder": str(folder), "model_mib": folder_mib(folder), "build": build})
    return {"runs": runs, "info": info}


def work_llama_cpp(prompt, gen_len, repeat, threads, logits_out):
    import llama_cpp
    from llama_cpp import Llama

    from parscale_edge.hub import fetch_gguf
    gguf = fetch_gguf(MODEL, progress=False)
    llm = Llama(model_path=str(gguf), n_ctx=len(prompt) + gen_len + 16, n_batch=512, n_ubatch=512,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))

    def one(p, n):
        llm.reset()
        try:
            llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        except Exception:  # noqa: BLE001 - optional counters
            pass
        t0 = time.perf_counter()
        llm.eval(p)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        steps, toks = [], []
        for _ in range(n):
            nxt = int(last_logits().argmax())
            toks.append(nxt)
            t0 = time.perf_counter()
            llm.eval([nxt])
            steps.append((time.perf_counter() - t0) * 1e3)
        out = {"prefill_ms": prefill_ms, "decode_ms": steps, "tokens": toks}
        try:  # llama.cpp's own counters, measured in C: a check on the Python-side timing
            perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
            out["llama_perf"] = {"prompt_ms": perf.t_p_eval_ms, "prompt_tokens": perf.n_p_eval,
                                 "eval_ms": perf.t_eval_ms, "eval_tokens": perf.n_eval}
        except Exception as e:  # noqa: BLE001 - optional
            out["llama_perf"] = {"error": str(e)}
        return out

    own = llm.tokenize(llm.detokenize(prompt), add_bos=False, special=False)
    runs = _repeat(one, lambda: one(prompt[:16], 4), prompt, gen_len, repeat)
    sys_info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return {"runs": runs, "info": {"gguf": str(gguf), "model_mib": folder_mib(gguf),
                                   "llama_cpp_python": llama_cpp.__version__, "system_info": sys_info.strip(),
                                   "flash_attn": "llama-cpp-python default (off)",
                                   "own_tokenizer_roundtrip_matches": own == list(prompt)}}


def work_ort_genai(prompt, gen_len, repeat, threads, logits_out, precision="int4"):
    import onnxruntime_genai as og
    folder, build = prepare_ort_genai(prepare_hf_folder(), precision)
    # Threads: the builder writes session_options into genai_config.json; set ours there.
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    cfg_path.write_text(json.dumps(cfg, indent=4) + "\n")
    model = og.Model(str(folder))
    p_arr = np.array(prompt, dtype=np.int32)

    def one(p, n):
        params = og.GeneratorParams(model)
        # min_length = max_length: eos cannot stop the run early (every peer does n steps).
        params.set_search_options(do_sample=False, max_length=len(p) + n + 1, min_length=len(p) + n + 1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(p, dtype=np.int32))  # runs the prompt
        prefill_ms = (time.perf_counter() - t0) * 1e3
        gen.generate_next_token()  # picks token 1 from the prompt logits: no model run
        toks = [int(gen.get_next_tokens()[0])]
        steps = []
        for _ in range(n):  # each call: one model run on the last token + greedy pick
            t0 = time.perf_counter()
            gen.generate_next_token()
            steps.append((time.perf_counter() - t0) * 1e3)
            toks.append(int(gen.get_next_tokens()[0]))
        return {"prefill_ms": prefill_ms, "decode_ms": steps, "tokens": toks[:n]}

    runs = _repeat(one, lambda: one(prompt[:16], 4), p_arr, gen_len, repeat)
    nodes = {}
    try:
        import onnx
        g = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        for node in g.node:
            nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
        mnb = [n for n in g.node if n.op_type == "MatMulNBits"]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mnb[0].attribute} if mnb else {}
    except Exception as e:  # noqa: BLE001 - description only
        attrs = {"error": str(e)}
    return {"runs": runs, "info": {"folder": str(folder), "model_mib": folder_mib(folder), "build": build,
                                   "onnxruntime_genai": og.__version__ if hasattr(og, "__version__") else version("onnxruntime-genai"),
                                   "matmulnbits_first_node_attrs": {k: v for k, v in attrs.items()
                                                                    if not isinstance(v, bytes)},
                                   "op_counts": dict(sorted(nodes.items(), key=lambda kv: -kv[1])[:12]),
                                   "timing": "append_tokens (prefill); generate_next_token (model run + greedy pick)"}}


WORKERS = {
    "llama.cpp": work_llama_cpp,
    "ort-genai-int4": work_ort_genai,
    "ort-genai-int8": lambda *a: work_ort_genai(*a, precision="int8"),
    "optimum-fp32": work_optimum,
    "optimum-graph-fp32": lambda *a: work_optimum(*a, plain_session=True),
    "torch-eager-fp32": work_torch,
    "ours-fp32": lambda *a: work_ours("fp32", *a),
    "ours-int4": lambda *a: work_ours("int4", *a),
}


def worker_main(a) -> None:
    spec = json.loads(Path(a.spec).read_text())
    out = {"peer": a.worker, "status": "ok"}
    t0 = time.perf_counter()
    try:
        res = WORKERS[a.worker](spec["prompt"], spec["gen_len"], spec["repeat"], spec["threads"],
                                spec.get("logits_out"))
        out.update(res)
    except BaseException as e:  # noqa: BLE001 - report any failure, the parent goes on
        out.update({"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                    "traceback": traceback.format_exc()[-4000:]})
    out["worker_seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.result).write_text(json.dumps(out, default=str) + "\n")


# ------------------------------------------------------------------------------------ parent
def summarize(runs: list[dict], prompt_len: int) -> dict:
    pre = np.array([r["prefill_ms"] for r in runs])
    dec = np.concatenate([r["decode_ms"] for r in runs])
    return {"prefill_ms_p50": round(float(np.median(pre)), 2),
            "prefill_tokens_per_s": round(float(prompt_len / np.median(pre) * 1e3), 1),
            "decode_ms_p50": round(float(np.percentile(dec, 50)), 3),
            "decode_ms_p90": round(float(np.percentile(dec, 90)), 3),
            "decode_tokens_per_s": round(float(1e3 / np.median(dec)), 1),
            "prefill_ms_all": [round(float(x), 2) for x in pre],
            "decode_steps": int(dec.size)}


def run_peer(name: str, spec: dict, workdir: Path, timeout: int) -> dict:
    spec_path = workdir / f"{name}.spec.json"
    res_path = workdir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path),
           "--result", str(res_path)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONUNBUFFERED="1")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"peer": name, "status": "failed", "error": f"timed out after {timeout} s"}
    if not res_path.exists():
        return {"peer": name, "status": "failed",
                "error": f"worker exited {r.returncode} without a result: {(r.stdout + r.stderr)[-1500:]}"}
    return json.loads(res_path.read_text())


def paired_ratios(results: list[dict]) -> dict:
    """For each of our exports and each peer: ours / theirs tok/s (prefill, decode) within every
    round, and the median over rounds (above 1: ours faster). Rounds where either failed are skipped."""
    by = {r["peer"]: {x["round"]: x["summary"] for x in r["rounds"] if "summary" in x} for r in results}
    out = {}
    for o in OURS:
        for peer, rounds in by.items():
            common = sorted(set(rounds) & set(by.get(o, {})))
            if not common or peer == o:
                continue
            pp = [by[o][k]["prefill_tokens_per_s"] / rounds[k]["prefill_tokens_per_s"] for k in common]
            tg = [by[o][k]["decode_tokens_per_s"] / rounds[k]["decode_tokens_per_s"] for k in common]
            out[f"{o}/{peer}"] = {"prefill_median": round(float(np.median(pp)), 3),
                                  "decode_median": round(float(np.median(tg)), 3),
                                  "prefill_per_round": [round(x, 3) for x in pp],
                                  "decode_per_round": [round(x, 3) for x in tg]}
    return out


def markdown(doc: dict) -> str:
    rows = doc["results"]
    ours = {r["peer"]: r for r in rows if r["peer"] in OURS and r["status"] == "ok"}
    head = ("| runtime | precision | MB | prefill tok/s | decode tok/s | decode ms p50 / p90 | max load before (cores busy; worker cpu s per s, min) |"
            " ours fp32 / it (pp, tg) | ours int4 / it (pp, tg) | greedy = ours fp32 |")
    lines = [f"smollm2-135m, batch 1, prompt {doc['settings']['prompt_len']} tokens of stdlib code, "
             f"{doc['settings']['gen_len']} greedy decode steps, {doc['settings']['threads']} thread(s), "
             f"{doc['settings'].get('rounds', 1)} interleaved rounds x {doc['settings']['repeat']} repeat(s); "
             "ratios: median over rounds of the ratio within a round", "", head, "|" + " --- |" * 10]
    for r in rows:
        if r["status"] != "ok":
            err = " ".join(r.get("error", "").split())[-160:].replace("|", "/")
            lines.append(f"| {r['peer']} | {r.get('precision', '')} | | failed: {err} | | | | | | |")
            continue
        s = r["summary"]

        def ratio(o):
            if o not in ours:
                return ""
            if o == r["peer"]:
                return "1.00, 1.00"
            pr = doc.get("paired_ratios", {}).get(f"{o}/{r['peer']}")
            if pr is None:
                return ""
            return f"{pr['prefill_median']:.2f}, {pr['decode_median']:.2f}"
        lines.append(f"| {r['peer']} | {r['precision']} | {r['info'].get('model_mib', '')} | "
                     f"{s['prefill_tokens_per_s']:.0f} | {s['decode_tokens_per_s']:.1f} | "
                     f"{s['decode_ms_p50']:.1f} / {s['decode_ms_p90']:.1f} | {r['loadavg_before'][0]:.2f} "
                     f"({r['cpu_busy_before']:.1f} busy; got {r['worker_cpu_per_wall']:.2f} cpu/s) | {ratio('ours-fp32')} | {ratio('ours-int4')} | "
                     f"{r.get('greedy_agreement_vs_ours_fp32', '')} |")
    lm = doc.get("logit_match")
    if lm:
        def num(k):
            v = lm.get(k)
            return "n/a" if v is None else f"{v:.2e}"
        lines += ["", f"Logit match on the {doc['settings']['prompt_len']}-token prompt (max abs, all positions): "
                  f"ours P=1 fp32 vs optimum fp32 {num('ours_fp32_vs_optimum_max_abs')} (limit {lm['limit']}: "
                  f"{ {True: 'pass', False: 'FAIL'}.get(lm.get('pass'), 'not measured')}); vs PyTorch eager {num('ours_fp32_vs_torch_eager_max_abs')}"]
    tc = doc.get("preparation", {}).get("transformers_check", {})
    if tc.get("status") == "ok":
        lines.append(f"transformers {tc['transformers']} loads our HF folder as {tc['class']}; "
                     f"max abs logit difference vs our PyTorch model {tc['max_abs_logit_diff_vs_ours_torch']:.2e}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="timed requests per peer per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all peers")
    ap.add_argument("--peers", default=",".join(n for n, _, _ in PEERS),
                    help="comma-separated subset of: " + ", ".join(n for n, _, _ in PEERS))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per peer (build included)")
    ap.add_argument("--no-prepare", action="store_true", help="skip HF folder / transformers check / builds")
    ap.add_argument("-o", "--output", default="bench/results/peers_smollm2.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker_main(a)

    from parscale_edge.device import device_info
    wanted = [p.strip() for p in a.peers.split(",") if p.strip()]
    unknown = set(wanted) - set(WORKERS)
    if unknown:
        raise SystemExit(f"unknown peers {sorted(unknown)}")
    prompt = prompt_ids(a.prompt_len)
    doc = {"what": "peers side by side: same model, prompt and settings", "model": MODEL,
           "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": device_info(),
           "niceness": os.nice(0), "python": sys.version.split()[0],
           "settings": {"batch": 1, "prompt_len": a.prompt_len, "gen_len": a.gen_len, "threads": a.threads,
                        "repeat": a.repeat, "rounds": a.rounds, "greedy": True,
                        "prompt": "parscale_edge.evaluate.stdlib_text() tokenized with the model's tokenizer, first "
                                  f"{a.prompt_len} ids, fed as ids to every runtime",
                        "timing": "prefill: one call over the prompt; decode: one call per token, each timed; "
                                  "tok/s = prompt_len / median prefill and 1000 / median step ms"},
           "versions": {d: version(d) for d in ("onnxruntime", "onnxruntime-genai", "llama-cpp-python", "optimum",
                                                "optimum-onnx", "transformers", "torch", "onnx", "onnx-ir", "numpy")},
           "preparation": {}, "results": []}
    workdir = Path(tempfile.mkdtemp(prefix="peers-"))
    try:
        if not a.no_prepare:
            # Builds run here, one at a time, before anything is measured.
            steps = [("hf_folder", lambda: {"folder": str(prepare_hf_folder())}),
                     ("transformers_check", lambda: check_transformers(prepare_hf_folder(), prompt, a.threads))]
            for prec in ("int4", "int8"):
                if f"ort-genai-{prec}" in wanted:
                    key = "ort_genai_build" if prec == "int4" else f"ort_genai_build_{prec}"
                    steps.append((key, lambda prec=prec: prepare_ort_genai(prepare_hf_folder(), prec)[1]))
            if {"optimum-fp32", "optimum-graph-fp32"} & set(wanted):
                steps.append(("optimum_export", lambda: prepare_optimum(prepare_hf_folder())[1]))
            for key, fn in steps:
                t0 = time.perf_counter()
                try:
                    doc["preparation"][key] = {"status": "ok", **fn()}
                except Exception as e:  # noqa: BLE001 - the peers that need it will fail with their own error
                    doc["preparation"][key] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]}
                doc["preparation"][key]["step_seconds"] = round(time.perf_counter() - t0, 1)  # 0 when cached
                print(f"prepare {key}: {doc['preparation'][key]}", flush=True)
        logits = {}
        order = [(name, what, precision) for name, what, precision in PEERS if name in wanted]
        merged: dict[str, dict] = {}
        for rnd in range(a.rounds):
            k = rnd % len(order)
            for name, what, precision in order[k:] + order[:k]:
                spec = {"prompt": prompt, "gen_len": a.gen_len, "repeat": a.repeat, "threads": a.threads}
                if name in ("ours-fp32", "optimum-fp32", "torch-eager-fp32"):
                    spec["logits_out"] = str(workdir / f"{name}.logits.npy")
                busy = cpu_busy()
                load = list(os.getloadavg())
                t0 = time.perf_counter()
                c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                r = run_peer(name, spec, workdir, a.timeout)
                c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                wall = time.perf_counter() - t0
                cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
                # CPU seconds the worker got per wall second (about `threads` when it was never
                # starved; clearly less means other processes took the CPU during the measurement)
                rec = {"round": rnd, "loadavg_before": load, "cpu_busy_before": busy, "seconds": round(wall, 1),
                       "worker_cpu_per_wall": round(cpu / max(wall, 1e-9), 2), "loadavg_after": list(os.getloadavg())}
                m = merged.setdefault(name, {"peer": name, "what": what, "precision": precision,
                                             "threads": a.threads, "status": "ok", "runs": [], "rounds": []})
                if r["status"] != "ok":
                    m.update(status="failed", error=r.get("error", ""))
                    print(f"{name:20s} round {rnd}: FAILED: {r.get('error', '')[:300]}", flush=True)
                    m["rounds"].append(rec)
                    continue
                m.setdefault("info", r.get("info", {}))
                m.setdefault("tokens", r["runs"][0].get("tokens"))
                rec["summary"] = summarize(r["runs"], a.prompt_len)
                m["rounds"].append(rec)
                m["runs"] += [{**{k2: v for k2, v in run.items() if k2 != "tokens"}, "round": rnd} for run in r["runs"]]
                if spec.get("logits_out") and Path(spec["logits_out"]).exists():
                    logits[name] = spec["logits_out"]
                s_ = rec["summary"]
                print(f"{name:20s} round {rnd}: pp{a.prompt_len} {s_['prefill_tokens_per_s']:7.1f} tok/s  tg{a.gen_len} "
                      f"{s_['decode_tokens_per_s']:6.1f} tok/s (p50 {s_['decode_ms_p50']:.1f} ms)  load {load[0]:.2f}, "
                      f"{busy} cores busy", flush=True)
        for name, _, _ in order:
            m = merged[name]
            if m["status"] == "ok":
                m["summary"] = summarize(m["runs"], a.prompt_len)
                m["loadavg_before"] = [max(x["loadavg_before"][0] for x in m["rounds"])]
                m["cpu_busy_before"] = max(x["cpu_busy_before"] for x in m["rounds"])
                m["worker_cpu_per_wall"] = min(x["worker_cpu_per_wall"] for x in m["rounds"])
            doc["results"].append(m)
        doc["paired_ratios"] = paired_ratios(doc["results"])
        ref = next((r for r in doc["results"] if r["peer"] == "ours-fp32" and r["status"] == "ok"), None)
        for r in doc["results"]:
            if ref and r["status"] == "ok" and r.get("tokens"):
                same = 0
                for x, y in zip(r["tokens"], ref["tokens"]):
                    if x != y:
                        break
                    same += 1
                r["greedy_agreement_vs_ours_fp32"] = f"{same}/{len(ref['tokens'])}"
        match = {"limit": 1e-3}
        if "ours-fp32" in logits:
            ours = np.load(logits["ours-fp32"])
            for other, key in (("optimum-fp32", "ours_fp32_vs_optimum_max_abs"),
                               ("torch-eager-fp32", "ours_fp32_vs_torch_eager_max_abs")):
                if other in logits:
                    match[key] = float(np.abs(ours - np.load(logits[other])).max())
            if "ours_fp32_vs_optimum_max_abs" in match:
                match["pass"] = match["ours_fp32_vs_optimum_max_abs"] < match["limit"]
        doc["logit_match"] = match
        doc["loadavg_at_end"] = list(os.getloadavg())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc["table_markdown"] = markdown(doc)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print()
    print(doc["table_markdown"])
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
