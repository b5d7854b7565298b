"""Peers' quality on one text: how far each 4-bit smollm2-135m is from our fp32 export.

The speed table (bench/peers/run.py) compares runtimes that do not compute the same thing: the
GGUF's Q4_1 weights are what llama.cpp runs and what our fp32 export dequantizes exactly, while
onnxruntime-genai's builder re-rounds them (and its lm_head) to its own 4-bit blocks. This script
scores the same sliding windows of held-out stdlib code (``parscale_edge.evaluate.stdlib_text``; window
512, stride 256, 4096 positions by default) with our fp32 export as the reference and reports,
per candidate, perplexity, KL(ref || cand) and top-1 agreement (``parscale_edge.evaluate.compare``):

* ``ours-int4``: our int4 export (GGUF blocks reused, Q4_1 minimum corrected, accuracy_level 4);
* ``ort-genai-int4``: onnxruntime-genai's int4 build of the same weights (run with plain
  onnxruntime over each window, empty past);
* ``ort-genai-int8``: its int8 build (``-p int8``), the peer at our int4's quality;
* ``llama.cpp``: llama-cpp-python on the GGUF itself (``logits_all``).

Run it with the peers' venv (bench/peers/README.md), after ``run.py`` has built the peers:
    .venv-peers/bin/python bench/peers/quality.py -o bench/results/peers_quality_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import MODEL, ensure_ours, peers_dir, prepare_hf_folder, prepare_ort_genai  # noqa: E402


def ort_genai_fn(folder: Path, threads: int):
    """Logits of onnxruntime-genai's decoder for whole windows: float32 [B, S, vocab]."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    s = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    past = [i.name for i in s.get_inputs() if i.name.startswith("past_key_values.")]
    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    kv, hd = dec["num_key_value_heads"], dec["head_size"]

    def fn(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        B, S = ids.shape
        feed = {"input_ids": ids, "attention_mask": np.ones((B, S), np.int64)}
        for name in past:  # empty past: [batch, kv_heads, 0, head_dim]
            feed[name] = np.zeros((B, kv, 0, hd), np.float32)
        return s.run(["logits"], feed)[0]
    return fn


def llama_cpp_fn(threads: int, window: int):
    """Logits of llama.cpp on the GGUF for whole windows: float32 [1, S, vocab]."""
    from llama_cpp import Llama

    from parscale_edge.hub import fetch_gguf
    llm = Llama(model_path=str(fetch_gguf(MODEL, progress=False)), n_ctx=window, n_batch=window,
                n_ubatch=window, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)

    def fn(ids: np.ndarray) -> np.ndarray:
        if ids.shape[0] != 1:
            raise ValueError("llama.cpp scores one row at a time")
        llm.reset()
        llm.eval(ids[0].tolist())
        return np.array(llm.scores[:ids.shape[1]], dtype=np.float32)[None]
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("-o", "--output", default="bench/results/peers_quality_smollm2.json")
    a = ap.parse_args()

    from parscale_edge.device import device_info
    from parscale_edge.evaluate import compare, onnx_logits_fn, stdlib_text
    from parscale_edge.runtime import OnnxCausalLM

    fp32 = OnnxCausalLM(ensure_ours("fp32", a.threads), device="cpu", threads=a.threads)
    tokens = fp32.tokenizer.encode(stdlib_text())[:a.positions + 1]
    genai, _ = prepare_ort_genai(prepare_hf_folder())
    genai8, _ = prepare_ort_genai(prepare_hf_folder(), "int8")
    candidates = {
        "ours-int4": lambda: onnx_logits_fn(OnnxCausalLM(ensure_ours("int4", a.threads), device="cpu",
                                                         threads=a.threads)),
        "ort-genai-int4": lambda: ort_genai_fn(genai, a.threads),
        "ort-genai-int8": lambda: ort_genai_fn(genai8, a.threads),
        "llama.cpp": lambda: llama_cpp_fn(a.threads, a.window),
    }
    ref = onnx_logits_fn(fp32)
    results = {}
    for name, make in candidates.items():
        t0 = time.perf_counter()
        r = compare(ref, make(), tokens, window=a.window, max_positions=a.positions)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["perplexity_change_pct"] = 100 * (r["cand_perplexity"] / r["ref_perplexity"] - 1)
        results[name] = r
        print(f"{name:15s} ppl {r['cand_perplexity']:.4f} ({r['perplexity_change_pct']:+.2f}% vs fp32 "
              f"{r['ref_perplexity']:.4f}), KL mean {r['kl_mean']:.4f}, top-1 {100 * r['top1_agreement']:.1f}%")
    doc = {"what": "4-bit (and onnxruntime-genai's 8-bit) peers' distance from our fp32 export of the same GGUF, same windows",
           "model": MODEL, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": device_info(),
           "settings": {"text": "parscale_edge.evaluate.stdlib_text() (held-out stdlib modules)", "window": a.window,
                        "stride": a.window // 2, "positions": a.positions, "threads": a.threads,
                        "reference": "ours-fp32 (the GGUF dequantized exactly)"},
           "ort_genai_folder": str(genai), "ort_genai_int8_folder": str(genai8), "results": results}
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
