"""Row 9, large models: every save path writes its weights as external data at a relative location
and passes the path-based ONNX checker; a model above 2 GB round-trips export -> quantize (slow,
built from constants in seconds)."""
import os
import shutil
import warnings

import numpy as np
import onnx
import pytest
import torch

from parscale_edge.manifest import DATA_FILE, MODEL_FILE
from parscale_edge.runtime import OnnxCausalLM
from parscale_edge.validate import read_graph_summary
from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder


def assert_relative_external_data(folder):
    """Every weight lives in folder/model.onnx.data, referenced by the bare file name, and the
    path-based checker (the one that works above 2 GB) accepts the folder; no stray files."""
    g = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    ext = [t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    locations = {e.value for t in ext for e in t.external_data if e.key == "location"}
    assert ext and locations == {DATA_FILE}
    big_inline = [t.name for t in g.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                  and len(t.raw_data) > 4096]
    assert not big_inline
    onnx.checker.check_model(str(folder / MODEL_FILE))
    # our own reader (parscale_edge.validate) sees the same references as the onnx package
    summary = read_graph_summary(folder / MODEL_FILE)
    assert {r.tensor for r in summary.external} == {t.name for t in ext}
    assert {r.location for r in summary.external} == {DATA_FILE}
    assert not [p.name for p in folder.iterdir() if p.suffix in (".onnx", ".data") and
                p.name not in (MODEL_FILE, DATA_FILE)]


@pytest.mark.parametrize("kw", [None, dict(precision="int4", block_size=16), dict(precision="int8", block_size=16, accuracy_level=4),
                                dict(precision="int8-dynamic")], ids=["export", "int4", "int8-check", "int8-dynamic"])
def test_every_save_path_writes_relative_external_data(tiny_exports, tmp_path, kw):
    _, rt = tiny_exports[2]
    folder = rt.folder
    if kw is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # check_positions > 0 runs the accuracy-level search, which re-saves the graph
            folder = quantize_folder(folder, tmp_path / "q", QuantConfig(**kw), compare_positions=16,
                                     check_positions=32 if kw.get("accuracy_level") == 4 else 0)
    assert_relative_external_data(folder)
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "m")  # loads after a move: nothing absolute
    ids = np.array([[1, 2, 3]])
    a, _ = OnnxCausalLM(folder, "cpu", 1).forward(ids, np.ones((1, 3), np.int64), np.arange(3)[None])
    b, _ = OnnxCausalLM(moved, "cpu", 1).forward(ids, np.ones((1, 3), np.int64), np.arange(3)[None])
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------- > 2 GB (slow)
VOCAB, HIDDEN = 70_000, 4096  # embedding and untied head 1.07 GiB each: 2.4 GiB of weights in all


def _free_gib(path) -> float:
    return shutil.disk_usage(path).free / 2**30


def _mem_gib() -> float:
    from parscale_edge.validate import available_memory_bytes

    return (available_memory_bytes() or 0) / 2**30


@pytest.mark.slow
@pytest.mark.large
def test_model_above_2gb_round_trips_export_and_quantize(tmp_path):
    """About 1 minute and 7 GiB peak RSS on 2 cores (measured)."""
    from parscale_edge.config import ParScaleConfig
    from parscale_edge.loading import LoadedModel
    from parscale_edge.model import ParScaleForCausalLM
    from parscale_edge.export import export_onnx

    if _free_gib(tmp_path) < 10 or _mem_gib() < 10:
        pytest.skip(f"needs 10 GiB of disk and 10 GiB of memory free (have {_free_gib(tmp_path):.1f} / {_mem_gib():.1f})")
    cfg = ParScaleConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                         attention_bias=True, family="qwen2", max_position_embeddings=256)
    with torch.device("meta"):
        model = ParScaleForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a small random block tiled over each big matrix: seconds, not minutes
        block = torch.randn(1000, HIDDEN, generator=g) * 0.02
        for p in (model.model.embed_tokens.weight, model.lm_head.weight):
            p.copy_(block.repeat(VOCAB // 1000, 1))
            p[:, 0] = torch.arange(VOCAB) / VOCAB  # every row differs
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p.copy_(torch.randn(p.shape[0], 64, generator=g).repeat(1, p.shape[1] // 64) * 0.02)
            elif p.dim() == 1:
                p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        for b in model.buffers():
            b.zero_()
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert weight_bytes > 2**31
    ids = torch.tensor([[11, 22, 33, 44]])
    with torch.no_grad():
        ref = model(ids, torch.ones_like(ids), torch.arange(4)[None])[0].numpy()
    fp32 = export_onnx(LoadedModel(model.eval(), None, "synthetic-2.4GiB", "0" * 64, {}), tmp_path / "fp32")
    del model
    assert (fp32 / DATA_FILE).stat().st_size > 2**31
    assert_relative_external_data(fp32)
    got, _ = OnnxCausalLM(fp32, "cpu", 2).forward(ids.numpy(), np.ones((1, 4), np.int64), np.arange(4)[None])
    np.testing.assert_allclose(got, ref, atol=1e-3)
    q = quantize_folder(fp32, tmp_path / "int4", QuantConfig(precision="int4", accuracy_level=0),
                        check_positions=0, compare_positions=0)
    shutil.rmtree(fp32)
    assert_relative_external_data(q)
    assert os.path.getsize(q / DATA_FILE) < 0.7 * weight_bytes  # the head is 4-bit now
    qlogits, _ = OnnxCausalLM(q, "cpu", 2).forward(ids.numpy(), np.ones((1, 4), np.int64), np.arange(4)[None])
    assert np.isfinite(qlogits).all()
    assert np.corrcoef(qlogits.reshape(-1), ref.reshape(-1))[0, 1] > 0.95  # int4 of random weights: close, not equal
