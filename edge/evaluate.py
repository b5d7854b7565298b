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


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], tokens: Sequence[int], window: int = 512,
               stride: int | None = None, max_positions: int | None = None) -> dict:
    """Sliding-window perplexity (the Hugging Face "strided" procedure).

    Each window of ``window`` tokens starts ``stride`` tokens after the previous one (default:
    ``window // 2``); only the tokens not scored by an earlier window are scored, each with at
    least ``window - stride`` tokens of context (except at the start).

    Args:
        logits_fn: maps int64 [1, S] token ids to float logits [1, S, vocab].
        tokens: the token ids of the text.
        max_positions: stop after scoring this many positions.
    Returns:
        ``{"perplexity", "nll" (mean, nats), "positions", "window", "stride"}``.
    Raises ValueError when fewer than 2 tokens are given.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window, got {stride}")
    total, count, scored_until = 0.0, 0, 1  # token 0 is never predicted
    begin = 0
    limit = tokens.size if max_positions is None else min(tokens.size, max_positions + 1)
    while scored_until < limit:
        end = min(begin + window, limit)
        chunk = tokens[begin:end]
        logits = np.asarray(logits_fn(chunk[None]), dtype=np.float64)[0]  # [S, V]
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        # position t (absolute) is predicted by logits at t-1
        first = max(scored_until, begin + 1)
        idx = np.arange(first, end)
        nll = lse[idx - 1 - begin] - logits[idx - 1 - begin, tokens[idx]]
        total += float(nll.sum())
        count += idx.size
        scored_until = end
        if end == limit:
            break
        begin += stride
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "positions": count, "window": window, "stride": stride}
