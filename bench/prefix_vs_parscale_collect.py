"""Copy what bench/prefix_vs_parscale.sh measured into bench/results/ (the run folders under runs/
are git-ignored): the sweep table and every finished full run's history.json and curves.png. The
comparison table itself is made by bench/adapter_eval.py --compare (README).

    python bench/prefix_vs_parscale_collect.py            # -> bench/results/prefix_vs_parscale/
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from parscale_edge.atomic import write_json  # noqa: E402

RUNS = ROOT / "runs" / "prefix_vs_parscale"
OUT = ROOT / "bench" / "results" / "prefix_vs_parscale"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sweep = []
    for h in sorted((RUNS / "sweep").glob("*/history.json")):
        d = json.loads(h.read_text())
        if "tokens_trained" not in d:
            continue
        arm, lr = h.parent.name.rsplit("-lr", 1)
        sweep.append({"arm": arm, "lr": float(lr), "tokens": d["tokens_trained"],
                      "validation_nll": d["evals"][-1]["nll"], "validation_perplexity": d["evals"][-1]["perplexity"],
                      "untrained_nll": d["evals"][0]["nll"], "dense_nll": d["dense"]["nll"],
                      "positions": d["evals"][-1]["positions"], "train_seconds": d["train_seconds"],
                      "tokens_per_second": d["tokens_trained"] / d["train_seconds"],
                      "trainable_parameters": d["trainable_parameters"]})
    sweep.sort(key=lambda r: (r["arm"], r["lr"]))
    picked = {p.stem[3:]: float(p.read_text()) for p in RUNS.glob("lr_*.txt")}
    write_json(OUT / "sweep.json", {
        "validation_text": "hash-held-out stdlib modules traceback.py, sched.py, multiprocessing/connection.py "
                           "(not trained on, not in the reported table); first 1024 positions, window 512",
        "picked_lr": picked, "runs": sweep})
    full = []
    for h in sorted((RUNS / "full").glob("*/history.json")):
        d = json.loads(h.read_text())
        if "tokens_trained" not in d:
            full.append(f"{h.parent.name}: unfinished, step {d['steps'][-1]['step'] if d['steps'] else 0}/"
                        f"{d['config']['steps']} (not copied)")
            continue
        dst = OUT / h.parent.name
        dst.mkdir(exist_ok=True)
        shutil.copy2(h, dst / "history.json")
        if (h.parent / "curves.png").exists():
            shutil.copy2(h.parent / "curves.png", dst / "curves.png")
        full.append(f"{h.parent.name}: finished, {d['tokens_trained']} tokens, {d['train_seconds']:.0f} s in steps")
    print("\n".join([f"sweep: {len(sweep)} runs, picked {picked}", *full]))


if __name__ == "__main__":
    main()
