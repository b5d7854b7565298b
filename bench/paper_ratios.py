"""The paper's inference-cost ratios from a profile: ParScale against parameter scaling.

The paper (Chen et al. 2025, Sec. 4 and Fig. 4; docs/parscale.md "The headline inference claim")
compares, for the same predicted loss, the *increase* over the P=1 model of

* P streams (ParScale), and
* a dense model with ``N * (k ln P + 1)`` non-embedding parameters (scaling law, Eq. 5),

in memory and latency, and reports dense increase / ParScale increase: "up to 22x less memory
increase and 6x less latency increase" at batch 1 (1.6B P=1 -> P=8 against ~3.2B dense, fp16 on an
A100, analytical), about 3.6x / 1x at batch 8.

Two ways to get the dense model's cost from a ``profile.json`` (``parscale profile`` or
``bench/gpu_check.py``), both reported when the rows allow:

* ``twin``: measured. Rows of kind ``dense`` with the same P are random-weight dense models of the
  equivalent size (:func:`parscale_edge.profile.dense_twin_config`); :func:`parscale_edge.profile.versus_dense_summary`.
* ``interpolated``: the cost of the equivalent size is interpolated linearly in non-embedding
  parameters between the P=1 model and a larger dense model of the same family measured alongside
  (rows of kind ``dense_anchor``, e.g. qwen2.5-coder-1.5b for qwen2.5-coder-0.5b). Needs
  ``non_embedding_params`` in the rows.

Memory is GPU memory (``vram``) when the rows have it, else resident memory (``rss``); latency is
TTFT + gen_len decode steps (input = output length, as in the paper). Units: MiB, ms.

    python bench/paper_ratios.py bench/results/gpu_check/profile.json -o bench/results/gpu_check
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from parscale_edge.profile import memory_mib, versus_dense_summary  # noqa: E402

#: the paper's ratios (dense increase / ParScale increase), P=1 -> P=8, fp16, A100, analytical
PAPER = {1: {"memory_ratio": 22.0, "latency_ratio": 6.0}, 8: {"memory_ratio": 3.6, "latency_ratio": 1.0}}
PAPER_NOTE = ("paper: 1.6B non-embedding model P=1 -> P=8 against the ~3.2B dense model of equal predicted code "
              "loss, fp16 on an A100, analytical estimates averaged over input = output length 64..512")


def _ratio(dense: float, parscale: float) -> float | None:
    return dense / parscale if dense > 0 and parscale > 0 else None


def interpolated_summary(rows: list[dict], law, memory: str) -> list[dict]:
    """ParScale against the dense cost interpolated at the equivalent size (see module docstring).

    For each (model, precision, batch, prompt_len) with a P=1 row and a ``dense_anchor`` row of
    the same family: dense increase at P = (anchor cost - P=1 cost) * (N_eq - N) / (N_anchor - N),
    N_eq = ``law.equivalent_dense_params(N, P)``. Rows without ``non_embedding_params`` are skipped."""
    out = []
    base_rows = [r for r in rows if r.get("kind") == "parscale" and r["P"] == 1 and r.get("non_embedding_params")]
    for b in base_rows:
        key = (b.get("family"), b["precision"], b["batch"], b["prompt_len"])
        anchors = [r for r in rows if r.get("kind") == "dense_anchor" and r.get("non_embedding_params")
                   and (r.get("family"), r["precision"], r["batch"], r["prompt_len"]) == key]
        if not anchors:
            continue
        a = anchors[0]
        N, Na = b["non_embedding_params"], a["non_embedding_params"]
        if Na <= N:
            continue
        for p in sorted({r["P"] for r in rows if r.get("kind") == "parscale" and r.get("model") == b.get("model")
                         and r["P"] > 1}):
            ps = next((r for r in rows if r.get("kind") == "parscale" and r.get("model") == b.get("model")
                       and r["P"] == p and (r["precision"], r["batch"], r["prompt_len"]) == key[1:]), None)
            if ps is None:
                continue
            frac = (law.equivalent_dense_params(N, p) - N) / (Na - N)
            row = {"precision": b["precision"], "batch": b["batch"], "prompt_len": b["prompt_len"], "P": p,
                   "method": "interpolated", "anchor": a.get("model"), "anchor_fraction": frac,
                   "parscale_memory_increase_mib": memory_mib(ps, memory) - memory_mib(b, memory),
                   "dense_memory_increase_mib": frac * (memory_mib(a, memory) - memory_mib(b, memory)),
                   "parscale_latency_increase_ms": ps["latency_ms"] - b["latency_ms"],
                   "dense_latency_increase_ms": frac * (a["latency_ms"] - b["latency_ms"])}
            row["memory_ratio"] = _ratio(row["dense_memory_increase_mib"], row["parscale_memory_increase_mib"])
            row["latency_ratio"] = _ratio(row["dense_latency_increase_ms"], row["parscale_latency_increase_ms"])
            out.append(row)
    return out


def paper_ratios(profile: dict, law_name: str = "stack-v2-python") -> dict:
    """All ratio rows of a loaded ``profile.json`` (twin and interpolated), with the paper's numbers.

    Returns ``{"memory": "vram"|"rss", "rows": [...], "paper": PAPER, "note": ...}``; every row has
    method, precision, batch, prompt_len, P, both increases (MiB, ms), their ratios (None when an
    increase is not positive: within noise) and ``paper_*_ratio`` for batch 1 and 8 at P=8."""
    from parscale_edge.scaling_law import PAPER as LAWS

    rows = profile["rows"]
    memory = "vram" if rows and all(r.get("vram_peak_mib") is not None for r in rows) else "rss"
    out = [dict(r, method="twin") for r in versus_dense_summary(rows, memory=memory)]
    out += interpolated_summary(rows, LAWS[law_name], memory)
    for r in out:
        ref = PAPER.get(r["batch"]) if r["P"] == 8 else None
        r["paper_memory_ratio"] = ref["memory_ratio"] if ref else None
        r["paper_latency_ratio"] = ref["latency_ratio"] if ref else None
    out.sort(key=lambda r: (r["method"], r["precision"], r["batch"], r["P"]))
    return {"memory": memory, "law": law_name, "rows": out, "paper": PAPER, "note": PAPER_NOTE}


def markdown(result: dict, title: str = "") -> str:
    """The ratio rows as a Markdown table (what the README quotes)."""
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}x"  # noqa: E731
    mem = "GPU memory" if result["memory"] == "vram" else "resident memory"
    lines = [f"### {title}" if title else "",
             f"Increase over P=1 ({mem} MiB, latency ms = TTFT + decode of gen_len tokens); ratio = dense / ParScale "
             f"(above 1: ParScale costs less). {result['note']}.", "",
             "| method | precision | batch | P | memory +MiB ParScale / dense (ratio) | latency +ms ParScale / dense "
             "(ratio) | paper (P=8) memory / latency |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        paper = (f"{fmt(r['paper_memory_ratio'])} / {fmt(r['paper_latency_ratio'])}"
                 if r["paper_memory_ratio"] is not None else "")
        lines.append(f"| {r['method']} | {r['precision']} | {r['batch']} | {r['P']} | "
                     f"{r['parscale_memory_increase_mib']:.1f} / {r['dense_memory_increase_mib']:.1f} "
                     f"({fmt(r['memory_ratio'])}) | {r['parscale_latency_increase_ms']:.1f} / "
                     f"{r['dense_latency_increase_ms']:.1f} ({fmt(r['latency_ratio'])}) | {paper} |")
    if not result["rows"]:
        lines.append("| (no P=1 row with a dense twin or anchor of the same family) | | | | | | |")
    return "\n".join(lines).lstrip("\n") + "\n"


def write_report(profile_json: str | Path, out_dir: str | Path, law_name: str = "stack-v2-python",
                 title: str = "") -> dict:
    """Read ``profile_json``, write ``paper_ratios.json`` and ``paper_ratios.md`` into ``out_dir``
    (atomically), return the result. Raises FileNotFoundError / KeyError for a missing or foreign file."""
    from parscale_edge.atomic import write_json

    profile = json.loads(Path(profile_json).read_text())
    result = paper_ratios(profile, law_name)
    out = Path(out_dir)
    write_json(out / "paper_ratios.json", result)
    md = out / "paper_ratios.md"
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(markdown(result, title))
    tmp.replace(md)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", help="profile.json from `parscale profile` or bench/gpu_check.py")
    ap.add_argument("-o", "--output", default=None, help="folder for paper_ratios.{json,md} (default: beside it)")
    ap.add_argument("--law", default="stack-v2-python", choices=["stack-v2-python", "pile"])
    a = ap.parse_args(argv)
    src = Path(a.profile)
    if not src.is_file():
        print(f"error: no such file: {src} (run `parscale profile ... -o DIR` or bench/gpu_check.sh first)",
              file=sys.stderr)
        return 2
    res = write_report(src, a.output or src.parent, a.law)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
