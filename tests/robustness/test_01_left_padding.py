"""Row 1, left padding: in a batch of prompts of lengths 3 and 11 the short one gets the logits
(1e-4, fp32) and the 32 greedy tokens it gets alone, for P in 1, 2, 4, 8."""
import numpy as np
import pytest

from parscale_edge.runtime import SamplingConfig, left_pad

SHORT = [5, 6, 7]
LONG = [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


def decode_with_logits(rt, prompts, n):
    """Greedy decode through ``rt.forward`` (left-padded, positions cumsum(mask)-1): returns
    (tokens [B, n], last-position logits [n, B, vocab])."""
    ids, mask, pos = left_pad(prompts, pad_id=0)
    logits, past = rt.forward(ids, mask, pos)
    toks, steps = [], []
    for _ in range(n):
        last = logits[:, -1]
        steps.append(last)
        nxt = last.argmax(-1).astype(np.int64)
        toks.append(nxt)
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        logits, past = rt.forward(nxt[:, None], mask, pos, past)
    return np.stack(toks, 1), np.stack(steps)


@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_short_prompt_in_a_padded_batch_matches_its_solo_run(tiny_exports, P):
    _, rt = tiny_exports[P]
    batch_toks, batch_logits = decode_with_logits(rt, [SHORT, LONG], 32)
    for row, prompt in enumerate([SHORT, LONG]):
        solo_toks, solo_logits = decode_with_logits(rt, [prompt], 32)
        np.testing.assert_allclose(batch_logits[:, row], solo_logits[:, 0], atol=1e-4, rtol=0)
        assert batch_toks[row].tolist() == solo_toks[0].tolist()
    # the prefill logits of every real token of the short row, not only the last one
    ids, mask, pos = left_pad([SHORT, LONG], 0)
    got, _ = rt.forward(ids, mask, pos)
    alone, _ = rt.forward(np.array([SHORT]), np.ones((1, 3), np.int64), np.arange(3)[None])
    np.testing.assert_allclose(got[0, -3:], alone[0], atol=1e-4, rtol=0)
    # the runtime's own loop gives the same 32 tokens for the padded batch as for each prompt alone
    cfg = SamplingConfig(max_new_tokens=32)
    gen = rt.generate([SHORT, LONG], cfg, eos_token_ids=[])
    assert gen == [rt.generate([p], cfg, eos_token_ids=[])[0] for p in (SHORT, LONG)]
    assert gen[0] == batch_toks[0].tolist() and all(len(t) == 32 for t in gen)


def test_default_positions_would_break_p_gt_1(tiny_exports):
    """Why the runtime passes cumsum positions: with positions 0..S-1 on the padded row, P>1 logits
    of the short prompt move (the prefix has no position, so ParScale is not shift-invariant)."""
    _, rt = tiny_exports[4]
    ids, mask, pos = left_pad([SHORT, LONG], 0)
    naive = np.arange(ids.shape[1])[None].repeat(2, 0)
    good, _ = rt.forward(ids, mask, pos)
    bad, _ = rt.forward(ids, mask, naive)
    assert np.abs(good[0, -1] - bad[0, -1]).max() > 1e-2
    np.testing.assert_allclose(good[1], bad[1], atol=1e-5)  # the unpadded row is unaffected
