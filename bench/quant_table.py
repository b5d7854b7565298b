"""Quantization table: size, quality against fp32 and decode speed for each precision variant.

For each model and P: the fp32 export (cached), then every variant quantized from it, compared with
the fp32 export over ``--positions`` positions of held-out Python standard-library code
(KL divergence, top-1 agreement, perplexity of both), and timed for decode at batch 1 (prompt 256,
``--gen-len`` new tokens, ``--threads`` threads). Results are appended to a JSON file (rows already
there are skipped, so a killed run resumes) and rendered as a Markdown table.

    python bench/quant_table.py --models smollm2-135m,qwen2.5-coder-0.5b --parallel 1,2 \
        -o bench/results/quant_table.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_prefill import machine, run_one  # noqa: E402

VARIANTS = {  # name -> quantize settings (None: the fp32 export itself)
    "fp32": None,
    "int8 L4": dict(precision="int8", accuracy_level=4, check=False),
    "int8 L0": dict(precision="int8", accuracy_level=0, check=False),
    "int4 asym L4": dict(precision="int4", symmetric=False, accuracy_level=4, check=False),
    "int4 asym L0": dict(precision="int4", symmetric=False, accuracy_level=0, check=False),
    "int4 asym auto": dict(precision="int4", symmetric=False, accuracy_level=4, check=True),
    "int4 asym b16 L4": dict(precision="int4", symmetric=False, accuracy_level=4, check=False, block_size=16),
    "int4 sym L4": dict(precision="int4", symmetric=True, accuracy_level=4, check=False),
    "int4 sym L0": dict(precision="int4", symmetric=True, accuracy_level=0, check=False),
    # re-rounding everything (no GGUF block reuse): what a plain export gets
    "int4 rtn asym L4": dict(precision="int4", symmetric=False, accuracy_level=4, check=False, gguf_blocks=False),
    "int4 rtn sym L4": dict(precision="int4", symmetric=True, accuracy_level=4, check=False, gguf_blocks=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--parallel", default="1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="where quantized folders go (default: cache/bench)")
    ap.add_argument("-o", "--output", default="bench/results/quant_table.json")
    a = ap.parse_args()

    from parscale_edge.prepare import ensure_export, parse_parallel
    from parscale_edge.evaluate import compare, onnx_logits_fn, stdlib_text
    from parscale_edge.hub import default_cache_dir
    from parscale_edge.runtime import OnnxCausalLM
    from parscale_edge.atomic import folder_size_mib, write_json
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder

    out = Path(a.output)
    data = json.loads(out.read_text()) if out.exists() else {"machine": machine(), "rows": []}
    done = {(r["model"], r["P"], r["variant"]) for r in data["rows"]}
    work = Path(a.workdir or Path(default_cache_dir()) / "bench")
    for model in a.models.split(","):
        for P in parse_parallel(a.parallel):
            fp32 = ensure_export(model, P, a.threads, progress=False)
            ref = OnnxCausalLM(fp32, device="cpu", threads=a.threads)
            tokens = ref.tokenizer.encode(stdlib_text())
            prompt = tokens[:256]
            ref_fn = onnx_logits_fn(ref)
            cache: dict = {}

            def cached_ref(ids):
                k = ids.tobytes()
                if k not in cache:
                    cache[k] = ref_fn(ids)
                return cache[k]

            for name in a.variants.split(","):
                if (model, P, name) in done:
                    continue
                spec = VARIANTS[name]
                t0 = time.perf_counter()
                if spec is None:
                    folder = fp32
                else:
                    s = dict(spec)
                    check = s.pop("check")
                    folder = quantize_folder(fp32, work / f"{model}-p{P}-{name.replace(' ', '-')}", QuantConfig(**s),
                                             overwrite=True, check_positions=2048 if check else 0,
                                             compare_positions=0, threads=a.threads)
                qtime = time.perf_counter() - t0
                rt = OnnxCausalLM(folder, device="cpu", threads=a.threads)
                q = compare(cached_ref, onnx_logits_fn(rt), tokens, max_positions=a.positions)
                run_one(rt, prompt[:16], 4)
                timing = run_one(rt, prompt, a.gen_len)
                from parscale_edge.manifest import Manifest

                man = Manifest.read(folder)
                row = {"model": model, "P": P, "variant": name, "size_mib": round(folder_size_mib(folder), 1),
                       "perplexity": q["cand_perplexity"], "fp32_perplexity": q["ref_perplexity"],
                       "ppl_change": q["cand_perplexity"] / q["ref_perplexity"] - 1, "kl_mean": q["kl_mean"],
                       "kl_p99": q["kl_p99"], "top1_agreement": q["top1_agreement"], "positions": q["positions"],
                       "decode_tokens_per_s": 1e3 / float(np.median(timing["decode_ms"])),
                       "prefill_tokens_per_s": len(prompt) / timing["prefill_ms"] * 1e3,
                       "threads": a.threads, "quantize_s": round(qtime, 1),
                       "gguf_repacked_nodes": (man.quantization or {}).get("gguf_repacked_nodes"),
                       "accuracy_check": (man.quantization or {}).get("accuracy_check"),
                       "loadavg": os.getloadavg()}
                data["rows"].append(row)
                write_json(out, data)
                print(f"{model} P={P} {name:<15} {row['size_mib']:7.1f} MiB  ppl {row['perplexity']:.4f} "
                      f"({row['ppl_change']:+.2%})  KL {row['kl_mean']:.4f}  top-1 {row['top1_agreement']:.2%}  "
                      f"decode {row['decode_tokens_per_s']:.1f} tok/s", flush=True)
    print(markdown(data["rows"]))


def markdown(rows: list[dict]) -> str:
    lines = ["| model | P | variant | MiB | perplexity | vs fp32 | KL mean | top-1 | decode tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['P']} | {r['variant']} | {r['size_mib']:.0f} | {r['perplexity']:.3f} | "
                     f"{r['ppl_change']:+.2%} | {r['kl_mean']:.4f} | {r['top1_agreement']:.1%} | "
                     f"{r['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
