"""Perplexity on held-out text (no torch here: the model is any ``logits_fn``).

Held-out text that exists offline on every machine: the Python standard library's own sources
(:func:`stdlib_text`).
"""
from __future__ import annotations

import math
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

#: Standard-library modules used as held-out code text (stable, present in every CPython).
HELDOUT_MODULES = ("textwrap.py", "difflib.py", "fractions.py", "heapq.py", "bisect.py", "shlex.py")


def stdlib_text(modules: Sequence[str] = HELDOUT_MODULES) -> str:
    """Concatenated source of standard-library modules of the running interpreter.

    Raises FileNotFoundError naming the module when one is missing."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for m in modules:
        p = root / m
        if not p.exists():
            raise FileNotFoundError(f"standard-library module {p} not found; pass another text file")
        parts.append(p.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def _windows(n_tokens: int, window: int, stride: int | None, max_positions: int | None):
    """Yield (begin, end, first): score absolute positions first..end-1 of window [begin, end)."""
    if window < 2:
        raise ValueError(f"the window must hold at least 2 tokens, got {window}")
    if max_positions is not None and max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    stride = max(1, window // 2) if stride is None else stride
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window, got {stride}")
    if n_tokens < 2:
        raise ValueError("scoring needs at least 2 tokens")
    limit = n_tokens if max_positions is None else min(n_tokens, max_positions + 1)
    begin, scored_until = 0, 1  # token 0 is never predicted
    while scored_until < limit:
        end = min(begin + window, limit)
        yield begin, end, max(scored_until, begin + 1)
        scored_until = end
        begin += stride


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], tokens: Sequence[int], window: int = 512,
               stride: int | None = None, max_positions: int | None = None) -> dict:
    """Sliding-window perplexity (the Hugging Face "strided" procedure).

    Each window of ``window`` tokens starts ``stride`` tokens after the previous one (default:
    ``window // 2``); only tokens not scored by an earlier window are scored, each with at least
    ``window - stride`` tokens of context (except at the start).

    Args:
        logits_fn: maps int64 [1, S] token ids to float logits [1, S, vocab].
        tokens: the token ids of the text.
        max_positions: stop after scoring this many positions.
    Returns:
        ``{"perplexity", "nll" (mean, nats), "positions", "window", "stride"}``.
    Raises ValueError for fewer than 2 tokens or a bad stride.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    total, count = 0.0, 0
    for begin, end, first in _windows(tokens.size, window, stride, max_positions):
        logp = _log_softmax(np.asarray(logits_fn(tokens[None, begin:end]))[0])
        idx = np.arange(first, end)
        total -= float(logp[idx - 1 - begin, tokens[idx]].sum())
        count += idx.size
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "positions": count, "window": window,
            "stride": max(1, window // 2) if stride is None else stride}


def compare(ref_fn: Callable[[np.ndarray], np.ndarray], cand_fn: Callable[[np.ndarray], np.ndarray],
            tokens: Sequence[int], window: int = 512, stride: int | None = None,
            max_positions: int | None = None) -> dict:
    """How far a candidate model's next-token distributions are from a reference's.

    Both models score the same sliding windows (see :func:`perplexity`). Per position:
    KL(ref || cand) in nats over the full vocabulary and whether the argmax agrees.

    Returns:
        ``{"kl_mean", "kl_p99", "kl_max", "top1_agreement" (0..1), "ref_perplexity",
        "cand_perplexity", "positions", "window", "stride"}``.
    Raises ValueError when the vocabularies differ.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    kls, agree, nll_r, nll_c = [], 0, 0.0, 0.0
    for begin, end, first in _windows(tokens.size, window, stride, max_positions):
        ids = tokens[None, begin:end]
        lr = _log_softmax(np.asarray(ref_fn(ids))[0])
        lc = _log_softmax(np.asarray(cand_fn(ids))[0])
        if lr.shape != lc.shape:
            raise ValueError(f"the models disagree on the vocabulary: {lr.shape[-1]} vs {lc.shape[-1]}")
        rows = np.arange(first, end) - 1 - begin
        lr, lc = lr[rows], lc[rows]
        kls.append((np.exp(lr) * (lr - lc)).sum(-1))
        agree += int((lr.argmax(-1) == lc.argmax(-1)).sum())
        tgt = tokens[np.arange(first, end)]
        nll_r -= float(lr[np.arange(rows.size), tgt].sum())
        nll_c -= float(lc[np.arange(rows.size), tgt].sum())
    kl = np.concatenate(kls)
    n = kl.size
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)), "kl_max": float(kl.max()),
            "top1_agreement": agree / n, "ref_perplexity": math.exp(nll_r / n),
            "cand_perplexity": math.exp(nll_c / n), "positions": n, "window": window,
            "stride": max(1, window // 2) if stride is None else stride}


def onnx_logits_fn(rt) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap an :class:`parscale_edge.runtime.OnnxCausalLM` as ``ids [B, S] -> logits float32 [B, S, V]`` (no cache;
    either graph kind and any cache dtype: :meth:`parscale_edge.runtime.OnnxCausalLM.score`)."""
    return rt.score


def read_text(path: str | None) -> tuple[str, str]:
    """(text, description): a UTF-8 file, or the held-out standard-library code when ``path`` is None.

    Raises FileNotFoundError / ValueError (not UTF-8) naming the file."""
    if path is None:
        return stdlib_text(), "Python standard-library code (" + ", ".join(HELDOUT_MODULES) + ")"
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} not found")
    try:
        return p.read_text(encoding="utf-8"), str(p)
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not UTF-8 text ({e})") from None
