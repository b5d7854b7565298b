"""bitsandbytes (LLM.int8, NF4) on our PyTorch model against fp32, as a reference for the ONNX path.

    python bench/bnb_compare.py --model smollm2-135m --positions 2048 -o bench/results/bnb_smollm2.json

Prints a clear message and exits 0 when bitsandbytes cannot run here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_prefill import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parallel", type=int, default=None)
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default="bench/results/bnb_compare.json")
    a = ap.parse_args()
    from parscale_edge.quant.bnb import BitsAndBytesUnavailable, check_bitsandbytes, quantize_linears

    try:
        version = check_bitsandbytes()
    except BitsAndBytesUnavailable as e:
        print(f"skipped: {e}")
        return
    from parscale_edge.prepare import load_for_export
    from parscale_edge.evaluate import compare, stdlib_text

    torch.set_num_threads(a.threads)
    ref = load_for_export(a.model, a.parallel, a.threads, progress=False)
    tokens = ref.tokenizer.encode(stdlib_text())

    def fn_of(model):
        def fn(ids):
            t = torch.from_numpy(ids)
            with torch.no_grad():
                return model(t, torch.ones_like(t), torch.arange(t.shape[1])[None])[0].float().numpy()
        return fn

    rows = []
    for mode in ("int8", "nf4"):
        cand = load_for_export(a.model, a.parallel, a.threads, progress=False).model
        n = quantize_linears(cand, mode)
        t0 = time.perf_counter()
        r = compare(fn_of(ref.model), fn_of(cand), tokens, max_positions=a.positions)
        r.update(mode=mode, layers=n, seconds=round(time.perf_counter() - t0, 1))
        rows.append(r)
        print(f"bitsandbytes {mode}: perplexity {r['ref_perplexity']:.4f} -> {r['cand_perplexity']:.4f} "
              f"({r['cand_perplexity'] / r['ref_perplexity'] - 1:+.2%}), KL {r['kl_mean']:.4f}, "
              f"top-1 {r['top1_agreement']:.2%} over {r['positions']} positions", flush=True)
    from parscale_edge.atomic import write_json

    out = write_json(a.output, {"machine": machine(), "bitsandbytes": version, "model": a.model,
                                "parallel": a.parallel, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
