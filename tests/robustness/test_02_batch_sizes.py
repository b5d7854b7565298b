"""Row 2, two batch sizes: the user batch B and the stream batch P*B. A cache sized for the wrong
one (or with other heads/head_dim, or a mask of the wrong length) is a clear error naming both
sizes, never garbage tokens."""
import numpy as np
import pytest

from parscale_edge.runtime import RuntimeInputError


def _prefill(rt, B, S=3):
    ids = np.arange(1, B * S + 1).reshape(B, S) % 90
    return rt.forward(ids, np.ones((B, S), np.int64), np.arange(S)[None].repeat(B, 0))


@pytest.mark.parametrize("P", [1, 2, 4])
def test_cache_for_another_batch_names_both_sizes(tiny_exports, P):
    _, rt = tiny_exports[P]
    _, present = _prefill(rt, B=1)  # P*1 rows
    step = dict(input_ids=np.array([[3], [4]]), attention_mask=np.ones((2, 4), np.int64),
                position_ids=np.array([[3], [3]]))
    with pytest.raises(RuntimeInputError) as e:
        rt.forward(past=present, **step)
    msg = str(e.value)
    assert f"has {P} rows" in msg and "batch 2" in msg and f"P*B = {2 * P}" in msg


@pytest.mark.parametrize("P", [2, 4])
def test_cache_sized_for_the_user_batch_instead_of_the_stream_batch(tiny_exports, P):
    """The classic mix-up: B rows where the graph needs P*B."""
    _, rt = tiny_exports[P]
    m = rt.manifest
    B = 2
    wrong = [np.zeros((B, m.num_key_value_heads, 3, m.head_dim), np.float32)] * (2 * m.num_layers)
    with pytest.raises(RuntimeInputError, match=rf"has {B} rows but input_ids has batch {B}.*P\*B = {P * B}"):
        rt.forward(np.array([[3], [4]]), np.ones((B, 4), np.int64), np.array([[3], [3]]), wrong)
    right = [np.zeros((P * B, m.num_key_value_heads, 3, m.head_dim), np.float32)] * (2 * m.num_layers)
    logits, present = rt.forward(np.array([[3], [4]]), np.ones((B, 4), np.int64), np.array([[3], [3]]), right)
    assert logits.shape == (B, 1, m.vocab_size) and present[0].shape == (P * B, m.num_key_value_heads, 4, m.head_dim)


def test_other_cache_shapes_and_mask_lengths_are_clear_errors(tiny_exports):
    _, rt = tiny_exports[2]
    m = rt.manifest
    _, present = _prefill(rt, B=1)
    ids, pos = np.array([[3]]), np.array([[3]])
    bad_heads = list(present)
    bad_heads[3] = np.zeros((2, m.num_key_value_heads + 1, 3, m.head_dim), np.float32)
    hd = m.head_dim
    with pytest.raises(RuntimeInputError, match=rf"past_key_values.1.value has shape \(2, 3, 3, {hd}\), expected "
                                                rf"\(P\*B, kv_heads, past, head_dim\) = \(2, 2, 3, {hd}\)"):
        rt.forward(ids, np.ones((1, 4), np.int64), pos, bad_heads)
    with pytest.raises(RuntimeInputError, match=r"past has 3 tensors; this model needs 4"):
        rt.forward(ids, np.ones((1, 4), np.int64), pos, present[:3])
    with pytest.raises(RuntimeInputError, match=r"attention_mask has shape \(1, 3\), expected \(B, past\+S\) = \(1, 4\)"):
        rt.forward(ids, np.ones((1, 3), np.int64), pos, present)
    with pytest.raises(RuntimeInputError, match=r"position_ids has shape \(1, 2\), expected \(1, 1\)"):
        rt.forward(ids, np.ones((1, 4), np.int64), np.array([[3, 4]]), present)
    logits, _ = rt.forward(ids, np.ones((1, 4), np.int64), pos, present)  # the right feed still works
    assert np.isfinite(logits).all()
