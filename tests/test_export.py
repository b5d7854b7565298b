"""The exported ONNX graph: golden logits, the dynamic B/S/past grid, folder contract."""
import itertools
import shutil

import numpy as np
import onnx
import pytest
import torch

from parscale_edge.manifest import DATA_FILE, MODEL_FILE, Manifest
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.export import export_onnx
from conftest import golden_device
from golden import GOLDEN, MODELS, run_cases


@pytest.fixture(scope="module")
def exported(golden_exports):
    return golden_exports


@pytest.mark.parametrize("name", MODELS)
def test_onnx_reproduces_authors_golden_logits(exported, name):
    _, sess = exported[name]
    errs = run_cases(GOLDEN / name, lambda ids, m, p, past: sess.forward(ids, m, p, past))
    bad = {k: v for k, v in errs.items() if not v <= 1e-4}
    assert len(errs) >= 9 and not bad, bad


@pytest.mark.parametrize("name", ["p2_untied", "p4_tied"])
def test_dynamic_grid_matches_pytorch(exported, name):
    """One file runs over B in {1,2,3}, S in {1,5,17}, past in {0,1,9} and matches PyTorch (1e-4)."""
    lm, sess = exported[name]
    cfg = lm.model.config
    rng = np.random.default_rng(0)
    worst = 0.0
    for B, S, past in itertools.product([1, 2, 3], [1, 5, 17], [0, 1, 9]):
        T = past + S
        ids_all = rng.integers(0, cfg.vocab_size, (B, T))
        mask = np.ones((B, T), dtype=np.int64)
        mask[0, : min(2, T - 1)] = 0  # some left padding in row 0
        pos_all = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        with torch.no_grad():
            t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
            _, cache = lm.model(t(ids_all[:, :past]), t(mask[:, :past]), t(pos_all[:, :past]), ()) if past else (None, ())
            ref, ref_present = lm.model(t(ids_all[:, past:]), t(mask), t(pos_all[:, past:]), cache)
            onnx_past = [c.numpy() for c in cache] if past else None
        got, present = sess.forward(ids_all[:, past:], mask, pos_all[:, past:], onnx_past)
        assert got.shape == (B, S, cfg.vocab_size)
        assert present[0].shape == (cfg.parscale_n * B, cfg.num_key_value_heads, T, cfg.head_dim)
        sel = mask[:, past:].astype(bool)
        worst = max(worst, float(np.abs(got[sel] - ref.numpy()[sel]).max()))
        np.testing.assert_allclose(present[-1], ref_present[-1].numpy(), atol=1e-4, rtol=0)
    assert worst <= 1e-4, worst


def test_folder_contract_and_relocation(exported, tmp_path):
    lm, sess = exported["p4_tied"]
    src = sess.folder
    man = Manifest.read(src)
    assert (man.parscale_n, man.parscale_n_tokens, man.num_layers) == (4, 8, 2)
    assert (man.num_key_value_heads, man.head_dim, man.vocab_size) == (2, 16, 300)
    assert len(man.source_sha256) == 64
    model = onnx.load(str(src / MODEL_FILE), load_external_data=False)
    locations = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
    assert locations == {DATA_FILE}  # one relative data file
    assert {p.key: p.value for p in model.metadata_props}["parscale_n"] == "4"
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    # the tied embedding is stored once (no transposed copy for lm_head)
    big = [i.name for i in model.graph.initializer if list(i.dims) in ([300, 64], [64, 300])]
    assert len(big) == 1, big
    # copy elsewhere, run from another cwd
    moved = shutil.copytree(src, tmp_path / "elsewhere" / "m")
    ids = np.array([[5, 6, 7]])
    a, _ = sess.forward(ids, np.ones((1, 3), np.int64), np.arange(3)[None])
    b, _ = OnnxCausalLM(moved, device=golden_device()).forward(ids, np.ones((1, 3), np.int64), np.arange(3)[None])
    np.testing.assert_array_equal(a, b)


def test_export_refuses_existing_folder_and_leaves_no_temp(exported, tmp_path):
    lm, _ = exported["p1_dense"]
    out = tmp_path / "x"
    out.mkdir()
    with pytest.raises(FileExistsError):
        export_onnx(lm, out)
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
