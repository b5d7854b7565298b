import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def golden_exports(tmp_path_factory):
    """Each golden model exported once per session: {name: (LoadedModel, OnnxCausalLM)}."""
    from edge.loading import load_hf_folder
    from edge.runtime import OnnxCausalLM
    from export import export_onnx
    from golden import GOLDEN, MODELS

    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in MODELS:
        lm = load_hf_folder(GOLDEN / name)
        out[name] = (lm, OnnxCausalLM(export_onnx(lm, root / name), device="cpu", threads=1))
    return out
