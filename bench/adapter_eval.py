"""Held-out perplexity of a dense model, its untrained ParScale conversions and trained adapters.

All rows score the same tokens at the same positions: the held-out standard-library modules of
:data:`edge.evaluate.HELDOUT_MODULES` (never trained on, see edge/corpus.py), ``--positions``
positions, sliding window ``--window`` with stride window/2, float32 PyTorch on CPU. The untrained
conversion of each adapter's P uses the same seed and prefix length as ``parscale train``
(``--seed``, the adapter's ``parscale_n_tokens``), i.e. it is exactly the run's starting point.

    python bench/adapter_eval.py smollm2-135m adapters/smollm2-135m-p2.safetensors \
        --json bench/results/adapter_eval_smollm2.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from edge.adapter import apply_adapter, read_adapter  # noqa: E402
from edge.atomic import write_json  # noqa: E402
from edge.evaluate import HELDOUT_MODULES, stdlib_text  # noqa: E402
from edge.loading import convert_to_parscale, load_model  # noqa: E402
from edge.train import evaluate_perplexity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("adapters", nargs="*")
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="conversion seed of the training runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(a.model, progress=False)
    import numpy as np

    tokens = np.asarray(lm.tokenizer.encode(stdlib_text()), dtype=np.int64)
    rows = []

    def run(name: str, model, P: int) -> None:
        t0 = time.perf_counter()
        r = evaluate_perplexity(model, tokens, a.positions, a.window)
        rows.append({"name": name, "P": P, "perplexity": r["perplexity"], "nll": r["nll"],
                     "positions": r["positions"], "seconds": time.perf_counter() - t0})
        print(f"{name:<34} P={P}  perplexity {r['perplexity']:.4f}  ({r['positions']} positions, "
              f"{rows[-1]['seconds']:.0f} s)", flush=True)

    run("dense", lm.model, 1)
    for path in a.adapters:
        meta = read_adapter(path)[1]
        P, n = int(meta["parscale_n"]), int(meta["parscale_n_tokens"])
        run(f"untrained conversion (seed {a.seed})", convert_to_parscale(lm, P, n_tokens=n, seed=a.seed).model, P)
        run(f"adapter {Path(path).name}", apply_adapter(lm, path).model, P)
    dense = rows[0]["perplexity"]
    print(f"\n| model | P | held-out perplexity | vs dense |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['P']} | {r['perplexity']:.3f} | {r['perplexity'] / dense - 1:+.2%} |")
    if a.json:
        write_json(a.json, {"model": a.model, "text": "held-out stdlib modules: " + ", ".join(HELDOUT_MODULES),
                            "text_tokens": int(tokens.size), "window": a.window, "stride": a.window // 2,
                            "threads": a.threads, "machine": f"{platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} logical cores", "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
