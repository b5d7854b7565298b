"""Execution-provider choice: CUDA only when it is listed *and* a probe session runs on it, else CPU
with one warning per process (CPU-only onnxruntime: no warning)."""
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from parscale_edge import providers
from parscale_edge.providers import CPU, CUDA, CUDA_OPTIONS, probe_model_bytes, provider_name, select
from parscale_edge.runtime import OnnxCausalLM, select_providers


@pytest.fixture(autouse=True)
def fresh_probe():
    providers._reset_for_tests()
    yield
    providers._reset_for_tests()


def _runtime_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def test_probe_graph_is_a_valid_onnx_model_that_doubles_its_input():
    model = onnx.load_from_string(probe_model_bytes())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Add"]
    sess = ort.InferenceSession(probe_model_bytes(), providers=[CPU])
    y = sess.run(None, {"x": np.array([1.5], dtype=np.float32)})[0]
    assert y.dtype == np.float32 and y.tolist() == [3.0]


def test_cpu_never_probes(monkeypatch):
    monkeypatch.setattr(providers, "_probe_cuda", lambda: pytest.fail("cpu must not probe CUDA"))
    assert select("cpu") == [CPU] == select_providers("cpu")


def test_auto_on_a_cpu_only_onnxruntime_is_silent(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert select("auto") == [CPU]
    assert _runtime_warnings(rec) == []


def test_listed_but_broken_cuda_falls_back_to_cpu_with_one_warning(monkeypatch, golden_exports):
    """onnxruntime lists CUDA, but the probe session cannot run on it (here: a CPU build, so ONNX
    Runtime itself refuses the provider): every model loads on the CPU, and the user is told once."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    _, rt = golden_exports["p2_untied"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert select_providers("auto") == [CPU]
        a = OnnxCausalLM(rt.folder, device="auto", threads=1)
        b = OnnxCausalLM(rt.folder, threads=1)
    msgs = _runtime_warnings(rec)
    assert len(msgs) == 1 and "does not work here" in msgs[0] and "running on CPU" in msgs[0], msgs
    assert a.session.get_providers() == [CPU] == b.session.get_providers()
    works, why = providers.cuda_status()
    assert not works and "CUDA provider could not be created" in why
    ids = np.array([[5, 6, 7]])
    la, _ = a.forward(ids, np.ones((1, 3), np.int64), np.arange(3)[None])
    lb, _ = rt.forward(ids, np.ones((1, 3), np.int64), np.arange(3)[None])
    np.testing.assert_array_equal(la, lb)  # the fallback is the ordinary CPU session


def test_cuda_requested_without_cuda_warns_once(monkeypatch):
    from importlib import metadata

    def version(name):
        if name != "onnxruntime":
            raise metadata.PackageNotFoundError(name)
        return "1.0"

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    monkeypatch.setattr(metadata, "version", version)  # a plain CPU install
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert select("cuda") == [CPU] and select("cuda") == [CPU]
    msgs = _runtime_warnings(rec)
    assert len(msgs) == 1 and "CUDA was requested" in msgs[0] and "parscale-edge[gpu]" in msgs[0]


def test_working_cuda_comes_first_with_exact_fp32_options(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(providers, "_probe_cuda", lambda: (True, ""))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = select("auto")
        assert select("cuda") == got
    assert _runtime_warnings(rec) == []
    assert [provider_name(p) for p in got] == [CUDA, CPU]
    assert got[0][1]["use_tf32"] == "0" and got[0][1] == CUDA_OPTIONS


def test_probe_result_is_cached(monkeypatch):
    calls = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(providers, "_probe_cuda", lambda: calls.append(1) or (False, "no driver"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            select("auto")
    assert calls == [1]


def test_both_onnxruntime_packages_installed_is_named(monkeypatch):
    from importlib import metadata

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    monkeypatch.setattr(metadata, "version", lambda name: "1.0")
    works, why = providers.cuda_status()
    assert not works and "both installed" in why and "pip uninstall -y onnxruntime onnxruntime-gpu" in why


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'gpu'; use auto, cpu or cuda"):
        select("gpu")


def test_provider_modules_import_without_torch_or_onnx():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            "import parscale_edge.providers, parscale_edge.profile\n"
            "print(parscale_edge.providers.select('auto'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "CPUExecutionProvider" in r.stdout, r.stderr
