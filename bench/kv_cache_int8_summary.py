"""Collect bench/kv_cache_int8.sh's results into bench/results/kv_cache_int8/summary.json: the quality
of the int8 KV cache against the float one (P=1, P=2, and P=1 calibrated on another text), against
the issue's bar for a default (<= +0.5% perplexity, >= 99% top-1 agreement), and KV bytes per request
(planned by the runtime, and allocated by it for P=1,2 at batch 1).

    python bench/kv_cache_int8_summary.py WORK_DIR RESULTS_DIR
"""
import json
import sys
from pathlib import Path

from parscale_edge.atomic import write_json
from parscale_edge.kv_cache import KVCache
from parscale_edge.manifest import Manifest
from parscale_edge.runtime import OnnxCausalLM

BAR = {"max_ppl_increase": 0.005, "min_top1_agreement": 0.99}


def main() -> int:
    work, res = Path(sys.argv[1]), Path(sys.argv[2])
    runs = {}
    for name in ("compare_p1", "compare_p2", "compare_p1_calib_argparse"):
        f = res / f"{name}.json"
        if f.exists():
            r = json.loads(f.read_text())
            ppl = r["cand_perplexity"] / r["ref_perplexity"] - 1
            runs[name] = {"P": r["candidate_parallel"], "positions": r["positions"], "window": r["window"],
                          "ref_perplexity": r["ref_perplexity"], "cand_perplexity": r["cand_perplexity"],
                          "ppl_increase": ppl, "kl_mean": r["kl_mean"], "kl_p99": r["kl_p99"],
                          "top1_agreement": r["top1_agreement"],
                          "meets_default_bar": ppl <= BAR["max_ppl_increase"]
                          and r["top1_agreement"] >= BAR["min_top1_agreement"]}
    f32, i8 = Manifest.read(work / "fp32"), Manifest.read(work / "kv8")
    memory = []
    rts = {k: OnnxCausalLM(work / k, device="cpu", threads=1) for k in ("fp32", "kv8")}
    for P, B in ((1, 1), (2, 1), (2, 4), (4, 4), (8, 4)):
        n = rts["fp32"].prefix_slots(P) if P in rts["fp32"].parallel_choices else (48 if P > 1 else 0)
        row = {"P": P, "batch": B, "context": 2048, "prefix_slots": n,
               "float32_mib": KVCache.planned_nbytes(f32, P, B, n + 2048) / 2**20,
               "int8_mib": KVCache.planned_nbytes(i8, P, B, n + 2048) / 2**20}
        if P in rts["fp32"].parallel_choices and B == 1:  # what the runtime really allocates
            for k, rt in rts.items():
                st = rt.new_state(B, 2048, P)
                row[f"allocated_{'float32' if k == 'fp32' else 'int8'}_mib"] = st.cache.nbytes / 2**20
                st.close()
        memory.append(row)
    write_json(res / "summary.json", {
        "model": "smollm2-135m (fp32 fused export, -P 1,2: P=2 is the untrained conversion)",
        "commands": open(Path(__file__).with_name("kv_cache_int8.sh")).read().splitlines()[9:],
        "kv_cache": i8.kv_cache, "default_bar": BAR, "quality": runs, "memory": memory})
    print(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
