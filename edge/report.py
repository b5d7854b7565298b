"""Result tables of ``parscale profile``, ``compare``, ``eval`` and ``scaling-law``: one row schema,
three printers (``--format md|csv|json``), in the manner of llama-bench; and the plain-text
summaries of ``eval``, ``compare`` (their default output) and ``device-info``.

A table is a list of rows, each a plain dict of result values (the keys the JSON results use:
``ttft_ms``, ``perplexity``, ...), and a list of :class:`Column` saying how to show them. The
markdown printer formats each cell for reading (rounded, units in the header) and leaves out the
optional columns whose cells are the same in every row; csv and json print every column's raw
values under their keys, for scripts. Units are the result keys' own (ms, MiB, tokens/s).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

FORMATS = ("md", "csv", "json")


@dataclass(frozen=True)
class Column:
    """One column: ``header`` in markdown, the row ``keys`` it shows (csv/json write each key as its
    own field), ``cell`` the markdown text of a row (default: the first key's value as ``str``).
    ``always`` False: markdown shows the column only when its cells differ between rows."""

    header: str
    keys: tuple[str, ...]
    cell: Callable[[dict], str] | None = None
    always: bool = True

    def text(self, row: dict) -> str:
        return self.cell(row) if self.cell else str(row.get(self.keys[0]))


@dataclass
class Table:
    """Rows (dicts of result values) and the columns that show them; ``title``: a line printed above
    the markdown table only."""

    columns: list[Column]
    rows: list[dict] = field(default_factory=list)
    title: str | None = None

    def keys(self) -> list[str]:
        """Every column's keys, in column order, each once: the csv header and the json fields."""
        return list(dict.fromkeys(k for c in self.columns for k in c.keys))


def num(key: str, spec: str, suffix: str = "") -> Callable[[dict], str]:
    """A cell showing ``row[key]`` formatted with ``spec`` (``".1f"``) and ``suffix``; ``nan`` for None."""
    def cell(row: dict) -> str:
        v = row.get(key)
        return f"{math.nan if v is None else v:{spec}}{suffix}"
    return cell


def format_md(table: Table) -> str:
    """A markdown table (header, ``---`` line, one line per row), ``title`` above it; optional columns
    appear only when they vary. Ends with a newline."""
    cols = [c for c in table.columns if c.always or len({c.text(r) for r in table.rows}) > 1]
    lines = [table.title] if table.title else []
    lines.append("| " + " | ".join(c.header for c in cols) + " |")
    lines.append("| " + " | ".join(["---"] * len(cols)) + " |")
    lines += ["| " + " | ".join(c.text(r) for c in cols) + " |" for r in table.rows]
    return "\n".join(lines) + "\n"


def format_csv(table: Table) -> str:
    """CSV with a header of :meth:`Table.keys` and the raw values (empty for a missing one)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=table.keys(), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(table.rows)
    return buf.getvalue()


def format_json(table: Table) -> str:
    """A JSON list of one object per row with the :meth:`Table.keys` (missing values null), indented."""
    keys = table.keys()
    return json.dumps([{k: r.get(k) for k in keys} for r in table.rows], indent=2) + "\n"


def format_table(table: Table, fmt: str) -> str:
    """``table`` as ``fmt`` (one of :data:`FORMATS`). Raises ValueError for another format."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; use one of {', '.join(FORMATS)}")
    return {"md": format_md, "csv": format_csv, "json": format_json}[fmt](table)


# --------------------------------------------------------------------------- the commands' tables
def profile_table(rows: Sequence[dict]) -> Table:
    """``parscale profile``'s rows (:func:`parscale_edge.profile.profile_folder` plus ``model``,
    ``kind``, ``P``): latency (ms, tokens/s), memory (MiB) and the bandwidth share; the provider and
    the cache dtype appear in markdown when they differ between rows."""
    return Table([
        Column("model", ("model",)), Column("kind", ("kind",)), Column("P", ("P",)),
        Column("precision", ("precision",)), Column("batch", ("batch",)), Column("prompt", ("prompt_len",)),
        Column("TTFT ms", ("ttft_ms",), num("ttft_ms", ".0f")),
        Column("prefill tok/s", ("prefill_tokens_per_s",), num("prefill_tokens_per_s", ".0f")),
        Column("decode ms p50/p90", ("decode_ms_p50", "decode_ms_p90"),
               lambda r: f"{r['decode_ms_p50']:.1f}/{r['decode_ms_p90']:.1f}"),
        Column("decode tok/s", ("decode_tokens_per_s",), num("decode_tokens_per_s", ".1f")),
        Column("peak RSS MiB", ("peak_rss_mib",), num("peak_rss_mib", ".0f")),
        Column("file MiB", ("file_mib",), num("file_mib", ".0f")),
        Column("load RSS / file", ("load_rss_ratio",), lambda r: f"{r.get('load_rss_ratio') or math.nan:.2f}x"),
        Column("KV MiB", ("kv_cache_mib",), num("kv_cache_mib", ".1f")),
        Column("bw share", ("bandwidth_share",), lambda r: f"{r.get('bandwidth_share', 0):.0%}"),
        Column("provider", ("provider",), always=False),
        Column("cache", ("cache_dtype",), always=False),
    ], list(rows))


def profile_header(machine: dict, rows: Sequence[dict], threads: int | None) -> str:
    """The line above ``parscale profile``'s table: the machine (:func:`parscale_edge.device.device_info`),
    the ONNX Runtime threads, and the read bandwidth (GB/s) the rows' bandwidth share is taken of."""
    bandwidths = sorted({str(r["bandwidth_ref_gbps"]) for r in rows if r.get("bandwidth_ref_gbps")})
    return (f"machine: {machine['cpu']['model']}, {machine['cpu']['logical_cores']} cores, {machine['memory_gib']} GiB, "
            f"threads {threads or 'ORT default'}; read bandwidth at those threads {', '.join(bandwidths) or 'n/a'} GB/s "
            "(the bandwidth share's reference)")


def versus_dense_table(summary: Sequence[dict]) -> Table:
    """:func:`parscale_edge.profile.versus_dense_summary`: the memory (MiB) and latency (ms) that P
    streams add over P=1, beside the scaling law's equivalent dense model's."""
    def ratio(key: str) -> Callable[[dict], str]:
        return lambda r: "n/a" if r[key] is None else f"{r[key]:.1f}x"

    return Table([
        Column("precision", ("precision",)), Column("batch", ("batch",)), Column("P", ("P",)),
        Column("memory +MiB ParScale / dense (ratio)",
               ("parscale_memory_increase_mib", "dense_memory_increase_mib", "memory_ratio"),
               lambda r: f"{r['parscale_memory_increase_mib']:.0f} / {r['dense_memory_increase_mib']:.0f} "
                         f"({ratio('memory_ratio')(r)})"),
        Column("latency +ms ParScale / dense (ratio)",
               ("parscale_latency_increase_ms", "dense_latency_increase_ms", "latency_ratio"),
               lambda r: f"{r['parscale_latency_increase_ms']:.0f} / {r['dense_latency_increase_ms']:.0f} "
                         f"({ratio('latency_ratio')(r)})"),
    ], list(summary), title="ParScale against parameter scaling (increase over P=1; dense = scaling-law equivalent, "
                            "random weights):")


def eval_table(rows: Sequence[dict]) -> Table:
    """``parscale eval`` results (:func:`parscale_edge.evaluate.perplexity` plus ``model``, ``P``,
    ``precision``, ``text``)."""
    return Table([
        Column("model", ("model",)), Column("P", ("P",)), Column("precision", ("precision",)),
        Column("perplexity", ("perplexity",), num("perplexity", ".4f")), Column("positions", ("positions",)),
        Column("window", ("window",)), Column("stride", ("stride",)), Column("text", ("text",)),
    ], list(rows))


def compare_table(rows: Sequence[dict]) -> Table:
    """``parscale compare`` results (:func:`parscale_edge.evaluate.compare` plus the two models, their
    P and precision): KL(ref||cand) in nats, top-1 agreement as a fraction."""
    return Table([
        Column("reference", ("reference",)), Column("P ref", ("reference_parallel",)),
        Column("precision ref", ("reference_precision",)), Column("candidate", ("candidate",)),
        Column("P cand", ("candidate_parallel",)), Column("precision cand", ("candidate_precision",)),
        Column("positions", ("positions",)),
        Column("KL mean", ("kl_mean",), num("kl_mean", ".5f")), Column("KL p99", ("kl_p99",), num("kl_p99", ".5f")),
        Column("KL max", ("kl_max",), num("kl_max", ".4f")),
        Column("top-1 agreement", ("top1_agreement",), num("top1_agreement", ".2%")),
        Column("ppl ref", ("ref_perplexity",), num("ref_perplexity", ".4f")),
        Column("ppl cand", ("cand_perplexity",), num("cand_perplexity", ".4f")),
    ], list(rows))


def eval_summary(r: dict) -> str:
    """The markdown (default) output of ``parscale eval``: one line of an :func:`eval_table` row."""
    return (f"{r['model']} (P={r['P']}, {r['precision']}): perplexity {r['perplexity']:.4f} over {r['positions']} "
            f"positions (window {r['window']}, stride {r['stride']}) of {r['text']}")


def compare_summary(r: dict) -> str:
    """The markdown (default) output of ``parscale compare``: four lines of a :func:`compare_table` row."""
    return "\n".join([
        f"{r['candidate']} (P={r['candidate_parallel']}, {r['candidate_precision']}) vs {r['reference']} "
        f"(P={r['reference_parallel']}, {r['reference_precision']}) over {r['positions']} positions of {r['text']}:",
        f"  KL(ref||cand) mean {r['kl_mean']:.5f}  p99 {r['kl_p99']:.5f}  max {r['kl_max']:.4f}",
        f"  top-1 agreement {r['top1_agreement']:.2%}",
        f"  perplexity ref {r['ref_perplexity']:.4f}  cand {r['cand_perplexity']:.4f} "
        f"({r['cand_perplexity'] / r['ref_perplexity'] - 1:+.2%})"])


def device_summary(info: dict, cuda_works: bool, cuda_why: str) -> str:
    """The output of ``parscale device-info``: :func:`parscale_edge.device.device_info`'s ``info``
    (bandwidth in GB/s, memory in GiB) and whether CUDA works (``cuda_why``: why not), one line each."""
    c, bw = info["cpu"], info["bandwidth"]
    flags = " ".join(c["flags"]) or "no SIMD flags read"
    lines = [f"CPU        {c['model']} ({c['logical_cores']} logical cores; {flags})",
             f"memory     {info['memory_gib']} GiB",
             f"bandwidth  {bw['read_gbps']} GB/s read, {bw['copy_gbps']} GB/s copy (one thread, {bw['array_mib']} MiB "
             "array)",
             f"runtime    onnxruntime {info['onnxruntime']}; providers {', '.join(info['providers'])}",
             "CUDA       " + ("works (CUDAExecutionProvider probe session ran)" if cuda_works else f"not used: {cuda_why}")]
    for g in info.get("gpu") or []:
        lines.append(f"GPU        {g['name']} ({g['memory_mib']} MiB, driver {g['driver']}, compute "
                     f"{g['compute_capability']})")
    la = info["loadavg"]
    lines.append(f"load avg   {' '.join(f'{x:.2f}' for x in la) if la else 'n/a'} (1/5/15 min)")
    load = bw.get("loadavg_1min")
    lines.append(f"           bandwidth measured {bw.get('measured_at', '?')}"
                 + (f" at load {load:.2f}" if load is not None else "") + " (cached; --refresh measures again)")
    return "\n".join(lines)


def fit_table(rows: Sequence[dict], title: str | None = None) -> Table:
    """``parscale scaling-law fit``: per dataset the fitted E, A, k, alpha, R^2 and the paper's
    constants (``paper_*`` None where the paper has no fit of that dataset: ``-``)."""
    def paper(key: str, spec: str) -> Callable[[dict], str]:
        return lambda r: "-" if r.get(key) is None else f"{r[key]:{spec}}"

    return Table([
        Column("dataset", ("dataset",)), Column("runs", ("runs",)),
        Column("E", ("E",), num("E", ".4f")), Column("A", ("A",), num("A", ".4g")),
        Column("k", ("k",), num("k", ".4f")), Column("alpha", ("alpha",), num("alpha", ".4f")),
        Column("R^2", ("r2",), num("r2", ".4f")),
        Column("paper E", ("paper_E",), paper("paper_E", ".4f")), Column("paper A", ("paper_A",), paper("paper_A", ".4g")),
        Column("paper k", ("paper_k",), paper("paper_k", ".4f")),
        Column("paper alpha", ("paper_alpha",), paper("paper_alpha", ".4f")),
    ], list(rows), title=title)


def predict_table(rows: Sequence[dict], title: str | None = None) -> Table:
    """``parscale scaling-law predict``: per P the predicted loss, the gain ``k ln P + 1`` and the
    dense model (non-embedding parameters) of equal predicted loss."""
    return Table([
        Column("P", ("P",)), Column("predicted loss", ("loss",), num("loss", ".4f")),
        Column("gain k ln P + 1", ("gain",), num("gain", ".3f", "x")),
        Column("dense equivalent (non-embedding)", ("dense_equivalent_params",), num("dense_equivalent_params", ".4g")),
    ], list(rows), title=title)
