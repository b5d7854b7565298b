import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


def golden_device() -> str:
    """Where golden-export sessions run: ``PARSCALE_TEST_DEVICE`` (cpu, cuda or auto; default cpu)."""
    return os.environ.get("PARSCALE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def golden_exports(tmp_path_factory):
    """Each golden model exported once per session: {name: (LoadedModel, OnnxCausalLM)}.

    The sessions run on ``PARSCALE_TEST_DEVICE`` (default cpu; bench/gpu_check.sh sets cuda)."""
    from parscale_edge.loading import load_hf_folder
    from parscale_edge.runtime import OnnxCausalLM
    from parscale_edge.export import export_onnx
    from golden import GOLDEN, MODELS

    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in MODELS:
        lm = load_hf_folder(GOLDEN / name)
        out[name] = (lm, OnnxCausalLM(export_onnx(lm, root / name), device=golden_device(), threads=1))
    return out
