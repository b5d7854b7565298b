"""Replays the golden cases of tests/data/parscale-golden (produced by the authors' implementation).

``run_cases(model_dir, forward)`` threads each case's cache through ``forward(ids, mask, pos, past)
-> (logits, past)`` and returns ``{(case, step): max abs diff}`` over the compared positions;
``fused_forward(rt)`` is that ``forward`` for a fused graph.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

GOLDEN = Path(__file__).parent / "data" / "parscale-golden"
MODELS = ["p1_dense", "p2_untied", "p4_tied"]


def load_cases(model_dir: Path):
    return json.loads((model_dir / "cases.json").read_text()), load_file(str(model_dir / "cases.safetensors"))


def run_cases(model_dir: Path, forward) -> dict[tuple[str, int], float]:
    man, T = load_cases(model_dir)
    errs = {}
    for case in man["cases"]:
        past = None
        for i, st in enumerate(case["steps"]):
            if st["past"] == "none":
                past = None
            logits, past = forward(T[st["input_ids"]], T[st["attention_mask"]], T[st["position_ids"]], past)
            got = np.asarray(logits, dtype=np.float64)
            exp = T[st["expected_logits"]].astype(np.float64)
            assert got.shape == exp.shape, (case["name"], i, got.shape, exp.shape)
            sel = T[st["compare_mask"]].astype(bool) if st.get("compare_mask") else np.ones(exp.shape[:2], bool)
            errs[(case["name"], i)] = float(np.abs(got[sel] - exp[sel]).max())
    return errs


def fused_forward(rt):
    """Adapt the golden (ids, mask, pos, past) protocol to a fused graph's runtime ``rt``
    (parscale_edge.runtime.OnnxCausalLM): left-padded chunks become right-padded ones with per-row lengths;
    logits come back at the original columns (padded columns zeroed); ``past`` is the DecodeState."""
    def forward(ids, mask, pos, state):
        B, S = ids.shape
        new = mask[:, -S:].astype(bool)
        q = new.sum(1)
        assert (new == (np.arange(S)[None] >= (S - q)[:, None])).all(), "golden chunks are left-padded"
        if state is None:
            state = rt.new_state(B, 64)
        chunk = np.zeros_like(ids)
        for b in range(B):
            chunk[b, :q[b]] = ids[b, S - q[b]:]
        idx = np.maximum(np.arange(S)[None] - (S - q)[:, None], 0)
        logits = rt.step(state, chunk, q, idx)
        logits[~new] = 0.0  # padded columns are not compared
        return logits, state
    return forward
