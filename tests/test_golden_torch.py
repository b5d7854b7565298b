"""Our PyTorch model against logits of the authors' implementation (docs/parscale.md semantics), 1e-4."""
import numpy as np
import pytest
import torch

from parscale_edge.loading import load_hf_folder
from golden import GOLDEN, MODELS, load_cases, run_cases


@pytest.fixture(scope="module", params=MODELS)
def golden_model(request):
    d = GOLDEN / request.param
    return d, load_hf_folder(d).model


def test_every_golden_case_matches_authors_logits(golden_model):
    d, model = golden_model

    @torch.no_grad()
    def forward(ids, mask, pos, past):
        logits, present = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), past or ())
        return logits.numpy(), present

    errs = run_cases(d, forward)
    assert len(errs) >= 9
    bad = {k: v for k, v in errs.items() if not v <= 1e-4}
    assert not bad, bad


def test_aggregation_weights_match_reference(golden_model):
    d, model = golden_model
    man, T = load_cases(d)
    if model.config.parscale_n == 1:
        pytest.skip("P=1 has no aggregation")
    pre = next(c for c in man["cases"] if c["name"] == "prefill")["steps"][0]
    with torch.no_grad():
        w = model.aggregation_weights(*(torch.from_numpy(T[pre[k]]) for k in ("input_ids", "attention_mask", "position_ids")))
    assert w.shape == T["agg.weights"].shape
    np.testing.assert_allclose(w.numpy(), T["agg.weights"], atol=1e-5, rtol=0)
    # the smoothing floor eps/P holds for every weight
    assert float(w.min()) >= model.config.parscale_attn_smooth / model.config.parscale_n - 1e-7
