"""ONNX Runtime generation loop: greedy agreement with PyTorch, sampling, stops (left padding and bad input:
tests/robustness/)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from parscale_edge.runtime import RuntimeInputError, SamplingConfig, left_pad, sample_next


def torch_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = torch.tensor([ids])
            logits, _ = model(t, torch.ones_like(t), torch.arange(len(ids))[None])
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["p1_dense", "p4_tied"])
def test_greedy_matches_pytorch_recompute(golden_exports, name):
    lm, rt = golden_exports[name]
    prompt = [11, 52, 7, 199, 3, 64]
    got = rt.generate([prompt], SamplingConfig(max_new_tokens=24), eos_token_ids=[])[0]
    assert got == torch_greedy(lm.model, prompt, 24)


def test_stops_on_eos_per_row(golden_exports):
    _, rt = golden_exports["p4_tied"]
    prompts = [[11, 52, 7], [8, 8, 8, 8]]
    free = rt.generate(prompts, SamplingConfig(max_new_tokens=12), eos_token_ids=[])
    stop = free[0][2]  # make row 0's third token an eos
    out = rt.generate(prompts, SamplingConfig(max_new_tokens=12), eos_token_ids=[stop])
    first = free[0].index(stop)
    assert out[0] == free[0][: first + 1]
    assert out[1] == free[1][: len(out[1])] and (len(out[1]) == 12 or out[1][-1] == stop)


def test_sampling_is_seeded_and_filters_work():
    rng_logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    greedy = sample_next(rng_logits, SamplingConfig(), np.random.default_rng(0))
    assert np.array_equal(greedy, rng_logits.argmax(-1))
    top1 = sample_next(rng_logits, SamplingConfig(do_sample=True, top_k=1), np.random.default_rng(5))
    assert np.array_equal(top1, greedy)
    tiny_p = sample_next(rng_logits, SamplingConfig(do_sample=True, top_p=1e-6), np.random.default_rng(5))
    assert np.array_equal(tiny_p, greedy)
    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_k=10, top_p=0.9, seed=1)
    a = [sample_next(rng_logits, cfg, np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    draws = np.stack([sample_next(rng_logits, cfg, np.random.default_rng(s)) for s in range(200)])
    top10 = np.argsort(-rng_logits, -1)[:, :10]
    assert all(np.isin(draws[:, b], top10[b]).all() for b in range(3))  # never outside top-k
    assert len(np.unique(draws[:, 0])) > 1  # really samples


def test_seeded_generation_is_reproducible(golden_exports):
    _, rt = golden_exports["p2_untied"]
    cfg = SamplingConfig(max_new_tokens=10, do_sample=True, temperature=1.0, seed=123)
    a = rt.generate([[1, 2, 3]], cfg, eos_token_ids=[])
    assert a == rt.generate([[1, 2, 3]], cfg, eos_token_ids=[])


def test_left_pad_positions():
    ids, mask, pos = left_pad([[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(RuntimeInputError, match="at least one token"):
        left_pad([[1], []], 0)


def test_runtime_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            "import parscale_edge.runtime, parscale_edge.tokenizer, parscale_edge.manifest, parscale_edge.cli, parscale_edge.hub, parscale_edge.evaluate, parscale_edge.validate\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("kw, sample, temperature", [
    ({}, False, 0.0),                                   # nothing asked: greedy
    ({"do_sample": True}, True, 1.0),                   # sampling at temperature 1 unless given
    ({"top_k": 5}, True, 1.0), ({"top_p": 0.9}, True, 1.0),
    ({"temperature": 0.7}, True, 0.7),
    ({"temperature": 0.0, "do_sample": True}, False, 0.0),  # temperature 0 stays greedy
])
def test_sampling_config_asked(kw, sample, temperature):
    s = SamplingConfig.asked(16, **kw)
    assert (s.do_sample, s.temperature, s.greedy, s.max_new_tokens) == (sample, temperature, not sample, 16)
