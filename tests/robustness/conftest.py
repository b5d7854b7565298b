"""Fixtures of the reliability suite (issue 8): tiny exports made once per session.

``tiny_exports``: random-weight Qwen2-family models for P in 1, 2, 4, 8 exported to ONNX.
``text_export``: a tiny GGUF with a byte-level BPE tokenizer, exported with P=2 (text in, text out).
``trained``: a tiny P=2 model trained for a few seconds to recite short question/answer lines, so
that quantization damage shows as text (row 6) and not only as a logit difference.
"""
from __future__ import annotations

import pytest
import torch

from robustness.helpers import train_qa_model

@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """{P: (LoadedModel, OnnxCausalLM)} for P in 1, 2, 4, 8 (vocab 97, hidden 48, 6 heads, 2 KV heads)."""
    from parscale_edge.runtime import OnnxCausalLM
    from parscale_edge.export import export_onnx
    from tiny import tiny_model

    root = tmp_path_factory.mktemp("robust-tiny")
    out = {}
    for P in (1, 2, 4, 8):
        lm = tiny_model("qwen2", P, seed=P)
        out[P] = (lm, OnnxCausalLM(export_onnx(lm, root / f"p{P}"), device="cpu", threads=1))
    return out


@pytest.fixture(scope="session")
def text_export(tmp_path_factory):
    """OnnxCausalLM of a tiny qwen2 GGUF (tokenizer included, context 256) converted to P=2."""
    from parscale_edge.loading import convert_to_parscale, load_gguf
    from parscale_edge.runtime import OnnxCausalLM
    from parscale_edge.export import export_onnx
    from tiny_gguf import write_tiny_gguf

    root = tmp_path_factory.mktemp("robust-text")
    write_tiny_gguf(root / "tiny.gguf", "qwen2")
    lm = convert_to_parscale(load_gguf(root / "tiny.gguf", progress=False), 2, n_tokens=4)
    return OnnxCausalLM(export_onnx(lm, root / "p2"), device="cpu", threads=1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(LoadedModel, OnnxCausalLM of its fp32 export) of :func:`train_qa_model`."""
    from parscale_edge.runtime import OnnxCausalLM
    from parscale_edge.export import export_onnx

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = train_qa_model()
    finally:
        torch.set_num_threads(prev)
    root = tmp_path_factory.mktemp("robust-trained")
    return lm, OnnxCausalLM(export_onnx(lm, root / "fp32"), device="cpu", threads=1)
