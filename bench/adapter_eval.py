"""Held-out perplexity of a dense model, its untrained ParScale conversions and trained adapters,
on held-out code and on a held-out text that is not Python; with ``--compare``, the controlled
comparison of README "Does ParScale help, or is it prefix tuning?" (arms, seeds, spreads).

Texts (``--texts``, both by default), every row scored on the same tokens and positions
(``--positions``, sliding window ``--window``, stride window/2, float32 PyTorch on CPU):

* ``code``: the held-out standard-library modules of :data:`parscale_edge.evaluate.HELDOUT_MODULES` (never
  trained on, see edge/corpus.py): the same domain as the training data.
* ``prose``: ``bench/data/GPL-3.txt``, the GNU GPL v3 text from Debian's base-files
  (/usr/share/common-licenses/GPL-3): English legal prose, no Python. A gain there is not domain
  adaptation to stdlib code.

Rows: the dense model; per arm (P, or P=1 with a prefix only) its untrained conversion (seed
``--seed``, the adapter's prefix length: the training runs' starting point); every adapter. An arm
is the set of adapters with the same P and kind; its seeds are the runs' ``--seed`` (read from the
``history.json`` next to each adapter, which also gives the training tokens and time). An adapter
without that file (e.g. ``adapters/smollm2-135m-p2.safetensors``) is an arm of its own.

``--compare`` adds, per arm and text: mean perplexity over seeds, the spread (min..max, and half the
range), vs dense and vs the P=1 prefix-only control, and whether the seed ranges of an arm and the
control are disjoint ("beyond spread").

``--cache DIR`` keeps each row's result (keyed by model, adapter sha256 or conversion settings, text
sha256, positions, window), so re-running after one more adapter costs only that adapter.

    python bench/adapter_eval.py smollm2-135m runs/prefix_vs_parscale/full/*/adapter.safetensors \\
        --compare --cache runs/prefix_vs_parscale/eval_cache --json bench/results/prefix_vs_parscale.json
    python bench/adapter_eval.py smollm2-135m adapters/smollm2-135m-p2.safetensors --texts code
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from parscale_edge.adapter import adapter_metadata  # noqa: E402
from parscale_edge.atomic import write_json  # noqa: E402
from parscale_edge.evaluate import HELDOUT_MODULES, stdlib_text  # noqa: E402

PROSE_FILE = ROOT / "bench" / "data" / "GPL-3.txt"
TEXTS = {
    "code": ("held-out stdlib modules: " + ", ".join(HELDOUT_MODULES), stdlib_text),
    "prose": ("GNU GPL v3 text (Debian base-files /usr/share/common-licenses/GPL-3; bench/data/GPL-3.txt), not Python",
              lambda: PROSE_FILE.read_text(encoding="utf-8")),
}


def arm_of(meta: dict) -> tuple[int, bool]:
    """(P, prefix_only) of an adapter's metadata."""
    return int(meta["parscale_n"]), meta.get("parscale_prefix_only") == "1"


def arm_name(P: int, prefix_only: bool) -> str:
    return f"P={P} prefix only" if prefix_only else f"P={P}"


def run_info(adapter: Path) -> dict:
    """Seed, lr, training tokens and seconds of the run that wrote ``adapter`` (its sibling
    history.json), or {} when there is none (e.g. a shipped adapter copied out of its run)."""
    h = adapter.parent / "history.json"
    if not h.exists():
        return {}
    d = json.loads(h.read_text())
    c = d.get("config", {})
    return {"seed": c.get("seed"), "lr": c.get("lr"), "tokens": d.get("tokens_trained"),
            "train_seconds": d.get("train_seconds"),
            "wall_seconds": sum(s.get("wall_seconds", 0.0) for s in d.get("sessions", [])),
            "tokens_per_second": (d["tokens_trained"] / d["train_seconds"]) if d.get("tokens_trained") else None,
            "run_evals": d.get("evals"), "run_dense": d.get("dense")}


def finished(adapters) -> list[Path]:
    """The adapters whose run is finished, in order; the others are named on stderr. A run writes
    adapter.safetensors at every checkpoint, and only a finished run's history.json has
    ``tokens_trained``, so a glob over runs/ must not score a run that is still training. An
    adapter without a history.json (a shipped copy) counts as finished."""
    out = []
    for p in adapters:
        h = p.parent / "history.json"
        if h.exists() and "tokens_trained" not in json.loads(h.read_text()):
            print(f"skipping {p}: its run is not finished ({h} has no tokens_trained yet)", file=sys.stderr)
            continue
        out.append(p)
    return out


def machine() -> dict:
    from parscale_edge.device import cpu_description, memory_gib

    cpu = cpu_description()
    return {"cpu": cpu["model"], "logical_cores": cpu["logical_cores"], "simd": cpu["flags"],
            "memory_gib": memory_gib(), "python": platform.python_version(), "platform": platform.platform()}


def summarize(rows: list[dict], texts: list[str]) -> list[dict]:
    """Per arm and text: seeds, mean/min/max perplexity, half range, vs dense, vs the P=1 control."""
    out = []
    dense = {r["text"]: r["perplexity"] for r in rows if r["kind"] == "dense"}
    arms: dict[str, list[dict]] = {}
    for r in rows:
        if r["kind"] == "adapter":
            arms.setdefault(r["arm"], []).append(r)
    control = "P=1 prefix only"
    for text in texts:
        stats = {}
        for arm, rs in arms.items():
            ppl = [r["perplexity"] for r in rs if r["text"] == text]
            if ppl:
                stats[arm] = {"mean": statistics.fmean(ppl), "min": min(ppl), "max": max(ppl), "values": ppl}
        for arm, s in sorted(stats.items(), key=lambda kv: (int(kv[0].split("=")[1].split()[0].rstrip(",")), kv[0] != control, kv[0])):
            rs = [r for r in arms[arm] if r["text"] == text]
            row = {"arm": arm, "text": text, "seeds": [r.get("seed") for r in rs], "n": len(rs),
                   # None: unknown (no history.json next to the adapter)
                   "tokens": sorted({r.get("tokens") for r in rs}, key=lambda t: t or 0),
                   "perplexity_mean": s["mean"], "perplexity_min": s["min"], "perplexity_max": s["max"],
                   "half_range": (s["max"] - s["min"]) / 2,
                   "std": statistics.stdev(s["values"]) if len(s["values"]) > 1 else None,
                   "vs_dense": s["mean"] / dense[text] - 1}
            if control in stats and arm != control:
                c = stats[control]
                row["vs_control"] = s["mean"] / c["mean"] - 1
                # needs two seeds on each side: one seed has no spread to compare with
                row["beyond_spread"] = (None if min(len(s["values"]), len(c["values"])) < 2
                                        else s["max"] < c["min"] or s["min"] > c["max"])
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("adapters", nargs="*")
    ap.add_argument("--texts", nargs="+", choices=list(TEXTS), default=list(TEXTS))
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="conversion seed of the untrained rows")
    ap.add_argument("--no-untrained", action="store_true", help="skip the untrained conversions")
    ap.add_argument("--compare", action="store_true", help="arms, seeds, spreads, vs dense and vs the P=1 control")
    ap.add_argument("--cache", default=None, help="folder of per-row results (only new rows are computed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    state: dict = {}

    def lm():
        if "lm" not in state:
            from parscale_edge.loading import load_model

            state["lm"] = load_model(a.model, progress=False)
        return state["lm"]

    texts = {t: TEXTS[t][1]() for t in a.texts}
    text_sha = {t: hashlib.sha256(s.encode()).hexdigest() for t, s in texts.items()}
    tokens: dict[str, np.ndarray] = {}

    def toks(t):
        if t not in tokens:
            tokens[t] = np.asarray(lm().tokenizer.encode(texts[t]), dtype=np.int64)
        return tokens[t]

    from parscale_edge.hub import sha256_file

    adapters = finished(map(Path, a.adapters))
    metas = {p: adapter_metadata(p) for p in adapters}
    shas = {p: sha256_file(p) for p in adapters}
    cache = Path(a.cache) if a.cache else None
    rows: list[dict] = []

    def run(kind: str, name: str, make, key: dict, extra: dict) -> None:
        for t in a.texts:
            k = {"model": a.model, "text_sha256": text_sha[t], "positions": a.positions, "window": a.window, **key}
            digest = hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()[:24]
            f = cache / f"{digest}.json" if cache else None
            if f is not None and f.exists():
                r = json.loads(f.read_text())
                cached = True
            else:
                from parscale_edge.train import evaluate_perplexity

                if "model" not in state or state.get("model_key") != name:
                    state["model"], state["model_key"] = make(), name
                t0 = time.perf_counter()
                r = evaluate_perplexity(state["model"], toks(t), a.positions, a.window)
                r = {"perplexity": r["perplexity"], "nll": r["nll"], "positions": r["positions"],
                     "text_tokens": int(toks(t).size), "seconds": time.perf_counter() - t0}
                if f is not None:
                    write_json(f, {**r, "key": k})
                cached = False
            row = {"kind": kind, "name": name, "text": t, **extra, "perplexity": r["perplexity"], "nll": r["nll"],
                   "positions": r["positions"], "text_tokens": r.get("text_tokens"), "seconds": r["seconds"]}
            rows.append(row)
            print(f"{name:<46} {t:<6} perplexity {r['perplexity']:.4f}  ({r['positions']} positions, "
                  f"{r['seconds']:.0f} s{', cached' if cached else ''})", flush=True)

    run("dense", "dense", lambda: lm().model, {"kind": "dense"}, {"P": 1, "arm": "dense"})
    arms = sorted({arm_of(m) + (int(m["parscale_n_tokens"]),) for m in metas.values()}, key=lambda x: (x[0], not x[1]))
    if not a.no_untrained:
        from parscale_edge.loading import convert_to_parscale

        for P, prefix_only, n in arms:
            arm = arm_name(P, prefix_only)
            run("untrained", f"untrained conversion {arm} (seed {a.seed})",
                lambda P=P, po=prefix_only, n=n: convert_to_parscale(lm(), P, n_tokens=n, seed=a.seed,
                                                                     prefix_only=po).model,
                {"kind": "untrained", "P": P, "prefix_only": prefix_only, "n_tokens": n, "seed": a.seed},
                {"P": P, "arm": arm, "seed": a.seed, "tokens": 0})
    from parscale_edge.adapter import apply_adapter

    for p in sorted(adapters, key=lambda p: (arm_of(metas[p])[0], not arm_of(metas[p])[1], str(p))):
        P, prefix_only = arm_of(metas[p])
        info = run_info(p)
        run("adapter", f"{arm_name(P, prefix_only)} {p.parent.name}/{p.name}" if info else f"adapter {p.name}",
            lambda p=p: apply_adapter(lm(), p).model, {"kind": "adapter", "adapter_sha256": shas[p]},
            {"P": P, "adapter": str(p),
             # runs of this comparison pool into their arm; an adapter without its run (a shipped
             # copy) is an arm of its own, so it never mixes with runs of another budget
             "arm": arm_name(P, prefix_only) + ("" if info else f", {p.name}"), "adapter_sha256": shas[p],
             **{k: v for k, v in info.items() if k not in ("run_evals", "run_dense")}})
        state.pop("model", None)

    dense = {r["text"]: r["perplexity"] for r in rows if r["kind"] == "dense"}
    print("\n| model | text | P | training tokens | perplexity | vs dense |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['text']} | {r['P']} | {r.get('tokens') or ''} | {r['perplexity']:.3f} | "
              f"{r['perplexity'] / dense[r['text']] - 1:+.2%} |")
    summary = summarize(rows, a.texts) if a.compare else None
    if summary:
        print("\n| arm | text | seeds | tokens | perplexity mean (min..max) | vs dense | vs P=1 prefix only |\n"
              "| --- | --- | --- | --- | --- | --- | --- |")
        for s in summary:
            verdict = {True: " (beyond seed spread)", False: " (within seed spread)", None: " (one seed: no spread)"}
            vc = f"{s['vs_control']:+.2%}{verdict[s['beyond_spread']]}" if "vs_control" in s else ""
            print(f"| {s['arm']} | {s['text']} | {s['n']} | {'/'.join(f'{t:,}' if t else '?' for t in s['tokens'])} | "
                  f"{s['perplexity_mean']:.3f} ({s['perplexity_min']:.3f}..{s['perplexity_max']:.3f}) | "
                  f"{s['vs_dense']:+.2%} | {vc} |")
    if a.json:
        import torch as _t

        write_json(a.json, {
            "model": a.model, "texts": {t: {"description": TEXTS[t][0], "sha256": text_sha[t],
                                            "tokens": next((r["text_tokens"] for r in rows if r["text"] == t), None)}
                                        for t in a.texts},
            "positions": a.positions, "window": a.window, "stride": a.window // 2, "threads": a.threads,
            "precision": "float32 PyTorch", "machine": machine(), "torch": _t.__version__,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "rows": rows, "summary": summary,
            "runs": {str(p): run_info(p) for p in adapters}})


if __name__ == "__main__":
    main()
