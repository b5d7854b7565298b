"""First decode/prefill benchmark: tokens/s at batch 1 for P streams of a model (ONNX Runtime, fp32).

Like llama-bench: prefill (pp) and decode (tg) are timed around the graph calls only, excluding
tokenisation and sampling (greedy argmax is outside the timed region). Results go to JSON with a
description of the machine.

    python bench/decode_prefill.py --model smollm2-135m --parallel 1,2,4 --prompt-len 256 \
        --gen-len 128 --threads 1 --repeat 3 -o bench/results/decode_prefill_smollm2.json
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def machine() -> dict:
    """The machine description every result file carries (:func:`parscale_edge.device.device_info`)."""
    from parscale_edge.device import device_info

    return device_info()


def run_one(rt, prompt: list[int], gen_len: int) -> dict:
    """One prefill of ``prompt`` then ``gen_len`` decode steps; times in ms
    (:func:`parscale_edge.profile.time_request`, the profiler's own loop)."""
    from parscale_edge.profile import time_request

    return time_request(rt, [prompt], gen_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="comma-separated models or export folders")
    ap.add_argument("--parallel", default="1,2,4")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("-o", "--output", default="bench/results/decode_prefill.json")
    a = ap.parse_args()

    from parscale_edge.atomic import folder_size_mib, write_json
    from parscale_edge.prepare import ensure_export, parse_parallel
    from parscale_edge.evaluate import stdlib_text
    from parscale_edge.runtime import OnnxCausalLM

    rows = []
    from parscale_edge.manifest import Manifest

    for model, P in [(m, p) for m in a.model.split(",") for p in parse_parallel(a.parallel)]:
        folder = ensure_export(model, P, a.threads, progress=False)
        man = Manifest.read(folder)
        P = P if P in man.parallel_choices() else man.parscale_n
        rt = OnnxCausalLM(folder, device="cpu", threads=a.threads, parallel=P)
        prompt = rt.tokenizer.encode(stdlib_text())[: a.prompt_len]
        run_one(rt, prompt[:16], 4)  # warm-up
        runs = [run_one(rt, prompt, a.gen_len) for _ in range(a.repeat)]
        pre = np.array([r["prefill_ms"] for r in runs])
        dec = np.concatenate([r["decode_ms"] for r in runs])
        row = {"model": model, "P": P, "precision": man.precision,
               "accuracy_check": (man.quantization or {}).get("accuracy_check", {}).get("chosen"),
               "batch": 1, "threads": a.threads,
               "prompt_len": a.prompt_len, "gen_len": a.gen_len, "repeat": a.repeat,
               "prefill_ms_p50": float(np.median(pre)), "prefill_tokens_per_s": float(a.prompt_len / np.median(pre) * 1e3),
               "decode_ms_p50": float(np.percentile(dec, 50)), "decode_ms_p90": float(np.percentile(dec, 90)),
               "decode_tokens_per_s": float(1e3 / np.median(dec)),
               "model_mib": round(folder_size_mib(folder), 1)}
        rows.append(row)
        print(f"{Path(str(model)).name} P={P} {man.precision}  pp{a.prompt_len}: {row['prefill_tokens_per_s']:.1f} tok/s (TTFT {row['prefill_ms_p50']:.0f} ms)"
              f"  tg{a.gen_len}: {row['decode_tokens_per_s']:.1f} tok/s (p50 {row['decode_ms_p50']:.1f} ms,"
              f" p90 {row['decode_ms_p90']:.1f} ms)", flush=True)
    out = write_json(a.output, {"machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
