"""The shipped smollm2-135m adapters (adapters/, trained by `parscale train`, README "Stage-2
training") on the real backbone: they load, and trained P beats the dense parent on held-out code."""
from pathlib import Path

import numpy as np
import pytest
import torch

from parscale_edge.adapter import apply_adapter, backbone_sha256, read_adapter
from parscale_edge.evaluate import stdlib_text
from parscale_edge.loading import load_model
from parscale_edge.train import evaluate_perplexity

pytestmark = pytest.mark.slow

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


@pytest.fixture(scope="module")
def dense():
    torch.set_num_threads(1)
    return load_model("smollm2-135m", progress=False)


def test_shipped_adapters_match_the_smollm2_backbone(dense):
    digest = backbone_sha256(dense.model)
    for P in sorted(int(p.stem.rsplit("-p", 1)[1]) for p in ADAPTERS.glob("smollm2-135m-p*.safetensors")):
        _, meta = read_adapter(ADAPTERS / f"smollm2-135m-p{P}.safetensors")
        assert meta["backbone_sha256"] == digest and meta["parscale_n"] == str(P) and meta["num_layers"] == "30"


def test_trained_p2_adapter_beats_the_dense_parent_on_heldout_code(dense):
    tokens = np.asarray(dense.tokenizer.encode(stdlib_text()), dtype=np.int64)
    base = evaluate_perplexity(dense.model, tokens, 2048, 512)["perplexity"]
    p2 = apply_adapter(dense, ADAPTERS / "smollm2-135m-p2.safetensors")
    trained = evaluate_perplexity(p2.model, tokens, 2048, 512)["perplexity"]
    assert base == pytest.approx(10.9480, abs=2e-3)  # the run's dense P=1 (history.json)
    # the controlled comparison's P=2 seed 0 (bench/prefix_vs_parscale.sh, full/p2-s0): its last eval
    assert trained == pytest.approx(10.5722, abs=2e-3)
    assert trained < base


def test_prefix_tuning_control_adapter_fits_and_reproduces_its_run(dense):
    """adapters/smollm2-135m-control-p1.safetensors: the P=1 prefix-only control of README "Does
    ParScale help, or is it prefix tuning?" (bench/prefix_vs_parscale.sh, full/p1prefix-s0)."""
    path = ADAPTERS / "smollm2-135m-control-p1.safetensors"
    _, meta = read_adapter(path)
    assert meta["backbone_sha256"] == backbone_sha256(dense.model)
    assert (meta["parscale_n"], meta["parscale_prefix_only"], meta["parscale_n_tokens"]) == ("1", "1", "48")
    ctl = apply_adapter(dense, path)
    assert ctl.model.config.parscale_prefix_only and not hasattr(ctl.model.model, "aggregate_layer")
    tokens = np.asarray(dense.tokenizer.encode(stdlib_text()), dtype=np.int64)
    trained = evaluate_perplexity(ctl.model, tokens, 2048, 512)["perplexity"]
    assert trained == pytest.approx(10.5722, abs=2e-3)  # the run's last eval (history.json), same positions
