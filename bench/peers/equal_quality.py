"""Speed at equal quality: each 4-bit/8-bit peer's distance from our fp32 export beside its decode and
prefill speed against ours int4, at every thread count measured, in one table.

Reads what one run of ``bench/peers/equal_quality.sh`` writes: ``bench/peers/run.py`` JSONs (one per
thread count; paired per-round ratios ours int4 / peer) and ``bench/peers/quality.py``'s JSON
(perplexity change, KL(fp32 || peer) mean, top-1 agreement with our fp32 over the same 4096
positions of held-out stdlib code). Writes the merged table as JSON (``-o``) and prints it as
Markdown. A ratio above 1 means ours int4 is faster; "range" is the min..max of the per-round ratios.

    python bench/peers/equal_quality.py --speed bench/results/peers_equal_quality_t1.json \\
        bench/results/peers_equal_quality_t2.json --quality bench/results/peers_quality_smollm2.json \\
        -o bench/results/peers_equal_quality.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OURS = "ours-int4"
#: the peers of the table, in order (llama.cpp's Q4_1 and its int8 build sit at our int4's quality)
PEERS = ("llama.cpp", "ort-genai-int8", "ort-genai-int4")


def read_inputs(speed_paths: list[str], quality_path: str) -> tuple[list[dict], dict]:
    """The run.py JSONs and the quality.py JSON, checked for the fields :func:`merge` reads. Raises
    ValueError naming the file that cannot be read or is not what its flag expects."""
    def load(path: str, flag: str, fields: tuple[str, ...]) -> dict:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{flag} {path}: cannot read it as JSON ({e})") from None
        if not isinstance(doc, dict) or any(f not in doc for f in fields):
            raise ValueError(f"{flag} {path}: not a {'bench/peers/run.py' if flag == '--speed' else 'bench/peers/quality.py'} "
                             f"result (no {', '.join(f for f in fields if not isinstance(doc, dict) or f not in doc)})")
        return doc

    speed = [load(p, "--speed", ("settings", "results")) for p in speed_paths]
    for path, doc in zip(speed_paths, speed):
        if not isinstance(doc["results"], list) or "threads" not in doc["settings"]:
            raise ValueError(f"--speed {path}: not a bench/peers/run.py result (results is not a list of runs)")
    quality = load(quality_path, "--quality", ("results",))
    if not isinstance(quality["results"], dict):
        raise ValueError(f"--quality {quality_path}: not a bench/peers/quality.py result (results is not a table)")
    return speed, quality


def merge(speed_docs: list[dict], quality: dict) -> dict:
    """``{"rows": [...], "machine": ..., "threads": [...]}``: one row per runtime (ours int4 and
    :data:`PEERS`) with its quality and, per thread count, its decode/prefill tok/s and the paired
    ratios ours int4 / it. Raises ValueError when a speed JSON lacks ours int4 or its rounds."""
    rows = []
    threads = [d["settings"]["threads"] for d in speed_docs]
    for name in (OURS, *PEERS):
        q = quality["results"].get(name, {})
        row = {"runtime": name, "perplexity_change_pct": q.get("perplexity_change_pct"),
               "kl_mean": q.get("kl_mean"), "top1_agreement": q.get("top1_agreement"), "speed": {}}
        for d in speed_docs:
            t = d["settings"]["threads"]
            res = {r["peer"]: r for r in d["results"]}
            if res.get(OURS, {}).get("status") != "ok":
                raise ValueError(f"the {t}-thread speed JSON has no successful {OURS} run")
            r = res.get(name)
            if r is None or r["status"] != "ok":
                row["speed"][t] = {"status": "missing" if r is None else "failed"}
                continue
            cell = {"decode_tokens_per_s": r["summary"]["decode_tokens_per_s"],
                    "prefill_tokens_per_s": r["summary"]["prefill_tokens_per_s"],
                    "precision": r.get("precision"), "rounds": len(r.get("rounds", []))}
            pr = d.get("paired_ratios", {}).get(f"{OURS}/{name}")
            if pr:
                cell.update(ours_int4_over_it_decode=pr["decode_median"],
                            decode_range=[min(pr["decode_per_round"]), max(pr["decode_per_round"])],
                            ours_int4_over_it_prefill=pr["prefill_median"],
                            prefill_range=[min(pr["prefill_per_round"]), max(pr["prefill_per_round"])])
            row["speed"][t] = cell
        rows.append(row)
    return {"what": __doc__.split("\n\n")[0], "threads": threads, "machine": speed_docs[0].get("machine"),
            "quality_settings": {k: quality["results"].get(OURS, {}).get(k) for k in ("positions", "window", "stride")},
            "rows": rows}


def markdown(doc: dict) -> str:
    th = doc["threads"]
    head = ["runtime", "perplexity vs fp32", "KL mean", "top-1"]
    for t in th:
        head += [f"decode tok/s ({t}t)", f"ours int4 / it, decode ({t}t)", f"prefill ({t}t)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in doc["rows"]:
        ppl = "" if r["perplexity_change_pct"] is None else f"{r['perplexity_change_pct']:+.2f}%"
        kl = "" if r["kl_mean"] is None else f"{r['kl_mean']:.4f}"
        top1 = "" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f}%"
        cells = [r["runtime"], ppl, kl, top1]
        for t in th:
            c = r["speed"].get(t, {})
            if "decode_tokens_per_s" not in c:
                cells += [c.get("status", ""), "", ""]
                continue
            if r["runtime"] == OURS:
                cells += [f"{c['decode_tokens_per_s']:.1f}", "1.00", "1.00"]
                continue
            lo, hi = c["decode_range"]
            cells += [f"{c['decode_tokens_per_s']:.1f}", f"{c['ours_int4_over_it_decode']:.2f} ({lo:.2f}..{hi:.2f})",
                      f"{c['ours_int4_over_it_prefill']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", nargs="+", required=True, help="bench/peers/run.py JSONs, one per thread count")
    ap.add_argument("--quality", required=True, help="bench/peers/quality.py JSON")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    try:
        doc = merge(*read_inputs(a.speed, a.quality))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    doc["sources"] = {"speed": a.speed, "quality": a.quality}
    doc["table_markdown"] = markdown(doc)
    print(doc["table_markdown"])
    if a.output:
        from parscale_edge.atomic import write_json

        write_json(Path(a.output), doc)
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
