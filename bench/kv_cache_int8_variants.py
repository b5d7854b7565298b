"""Which int8 KV-cache scales (issue 18, item 2): per channel or per tensor, and the margin over the
calibration maximum, each compared with the float cache of the same fused export.

Calibrates once (:func:`parscale_edge.quant.kv_int8.calibrate`: held-out stdlib code, 2048 tokens,
every P the folder offers), writes each variant's graph beside the int8 folder's model.onnx (same
weights file) and runs :func:`parscale_edge.evaluate.compare` (window 1024, 1024 positions) at P=1
for every variant and at P=2 for the two quantization types:

    python bench/kv_cache_int8_variants.py FLOAT_FOLDER INT8_FOLDER -o bench/results/kv_cache_int8/variants.json

FLOAT_FOLDER: an fp32 fused export offering P=1,2; INT8_FOLDER: its ``--kv-cache int8`` copy (only
its manifest and weights are used; the variant graph is removed afterwards).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from parscale_edge.atomic import write_json
from parscale_edge.evaluate import compare, onnx_logits_fn, stdlib_text
from parscale_edge.quant.kv_int8 import calibrate, rewrite_graph, scales
from parscale_edge.runtime import OnnxCausalLM

VARIANTS = (("PER_CHANNEL", 1.0), ("PER_CHANNEL", 1.2), ("PER_TENSOR", 1.0), ("PER_CHANNEL", 0.9))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("float_folder")
    ap.add_argument("int8_folder")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    src, folder = Path(a.float_folder), Path(a.int8_folder)
    ak, av, info = calibrate(src, threads=a.threads)
    spread = {kind: [round(float(x.max() / np.median(x)), 1) for x in amax]
              for kind, amax in (("key", ak), ("value", av))}  # per layer: largest channel max / median
    ref = OnnxCausalLM(src, device="cpu", threads=a.threads)
    tokens = ref.tokenizer.encode(stdlib_text())
    rows = []
    try:
        for P in (1, 2):
            ref.set_parallel(P)
            cache: dict = {}
            ref_fn = onnx_logits_fn(ref)

            def cached_ref(ids):  # the float reference is scored once per window
                key = ids.tobytes()
                if key not in cache:
                    cache[key] = ref_fn(ids)
                return cache[key]

            for quant, margin in VARIANTS:
                if P == 2 and margin != 1.0:
                    continue
                g = onnx.load(str(src / "model.onnx"), load_external_data=False)
                rewrite_graph(g, scales(ak, quant, margin), scales(av, quant, margin), quant)
                onnx.save(g, str(folder / "variant.onnx"))
                cand = OnnxCausalLM(folder, device="cpu", threads=a.threads, model_file="variant.onnx", parallel=P)
                t = time.perf_counter()
                r = compare(cached_ref, onnx_logits_fn(cand), tokens, window=1024, max_positions=1024)
                r.update(P=P, quant=quant, margin=margin, ppl_increase=r["cand_perplexity"] / r["ref_perplexity"] - 1,
                         seconds=round(time.perf_counter() - t, 1))
                rows.append(r)
                print(json.dumps(r), flush=True)
    finally:
        (folder / "variant.onnx").unlink(missing_ok=True)
    write_json(Path(a.output), {"command": " ".join(["python", *sys.argv]), "calibration": info,
                                "channel_max_over_median": spread, "variants": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
