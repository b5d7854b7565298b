"""PNG plots of profiler results (matplotlib, optional: ``pip install "parscale-edge[profile]"``)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_profile(rows: list[dict], out_dir: Path, title: str) -> list[Path]:
    """decode ms per step and peak memory against P, one line per (precision, batch)."""
    plt = _plt()
    rows = [r for r in rows if r.get("kind", "parscale") == "parscale"]
    paths = []
    gpu = bool(rows) and all(r.get("vram_peak_mib") is not None for r in rows)
    memory = ("vram_peak_mib", "peak GPU memory in use while decoding (MiB)") if gpu else \
        ("peak_rss_mib", "peak RSS while decoding (MiB)")
    for metric, label, fname in (("decode_ms_p50", "decode ms per step (p50)", "profile_decode.png"),
                                 (*memory, "profile_memory.png"),
                                 ("ttft_ms", "time to first token (ms)", "profile_ttft.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        groups = sorted({(r["model"], r["precision"], r["batch"], r["prompt_len"]) for r in rows})
        for g in groups:
            pts = sorted((r["P"], r[metric]) for r in rows if (r["model"], r["precision"], r["batch"], r["prompt_len"]) == g)
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o",
                    label=f"{g[0]} {g[1]} batch {g[2]} prompt {g[3]}")
        ax.set_xlabel("P (parallel streams)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_versus_dense(summary: list[dict], out_dir: Path, title: str) -> Path:
    """Paper Fig. 4 style: memory and latency increase over P=1, ParScale against the dense model
    of equal predicted loss, per batch size."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (metric, label), ax in zip((("memory_increase_mib", "memory increase over P=1 (MiB)"),
                                    ("latency_increase_ms", "latency increase over P=1 (ms)")), axes):
        for prec, B in sorted({(r["precision"], r["batch"]) for r in summary}):
            sel = sorted((r for r in summary if (r["precision"], r["batch"]) == (prec, B)), key=lambda r: r["P"])
            ps = [r["P"] for r in sel]
            line = ax.plot(ps, [r["parscale_" + metric] for r in sel], marker="o", label=f"ParScale {prec} b{B}")
            ax.plot(ps, [r["dense_" + metric] for r in sel], marker="s", linestyle="--", color=line[0].get_color(),
                    label=f"dense equal-loss {prec} b{B}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("P (dense: the scaling law's equivalent size)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out_dir / "versus_dense.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training(history: dict, path: Path, title: str | None = None) -> Path:
    """Training curves of ``parscale train`` (its ``history.json``): training loss (nats/token, raw
    and a 10-step moving mean) and held-out perplexity against tokens seen, with the dense P=1
    parent's perplexity as a reference line. Written atomically (temporary file + rename)."""
    import os

    import numpy as np

    plt = _plt()
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    steps = history.get("steps", [])
    if steps:
        tok = np.array([s["tokens"] for s in steps], dtype=float)
        loss = np.array([s["loss"] for s in steps], dtype=float)
        axes[0].plot(tok, loss, alpha=0.35, label="loss per step")
        k = min(10, len(loss))
        axes[0].plot(tok[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), label=f"{k}-step mean")
    axes[0].set_xlabel("training tokens")
    axes[0].set_ylabel("training loss (nats/token)")
    axes[0].legend(fontsize=7)
    evals = history.get("evals", [])
    P = history.get("config", {}).get("parallel", "?")
    if history.get("config", {}).get("prefix"):
        P = f"{P} prefix only"  # the prefix-tuning control (parscale_edge.train.TrainConfig.prefix)
    if evals:
        axes[1].plot([e["tokens"] for e in evals], [e["perplexity"] for e in evals], marker="o", label=f"P={P}")
    if "dense" in history:
        axes[1].axhline(history["dense"]["perplexity"], color="gray", linestyle="--", label="dense P=1 parent")
    axes[1].set_xlabel("training tokens")
    axes[1].set_ylabel(f"held-out perplexity ({evals[0]['positions'] if evals else '?'} positions)")
    if evals or "dense" in history:
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"parscale train: {history.get('source', '?')}, P={P}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
