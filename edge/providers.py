"""Which ONNX Runtime execution provider runs a model: CUDA when it is there *and works*, else CPU.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as soon as it is installed, also on a machine
whose driver, CUDA or cuDNN libraries are missing or do not match; ONNX Runtime then falls back
to the CPU silently, or fails at the first run. So :func:`cuda_status` opens a session on a
one-node graph (``y = x + x``) with the CUDA provider first, checks that CUDA was really assigned
and that the run gives the right number. The answer is cached per process, and a fallback warns
once per process, not once per loaded model.

Importable without torch and without the ``onnx`` package: the probe graph is written as
protobuf bytes here (:func:`probe_model_bytes`; tests check it against ``onnx``).
"""
from __future__ import annotations

import contextlib
import io
import warnings

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

#: CUDA provider options: exact float32 matmuls (ONNX Runtime enables TF32 by default, which moves
#: fp32 logits by about 1e-2; fp16 graphs are not affected) and an arena that grows by what is
#: requested rather than to the next power of two (so measured GPU memory is what the model needs).
CUDA_OPTIONS = {"device_id": "0", "use_tf32": "0", "arena_extend_strategy": "kSameAsRequested"}

_status: tuple[bool, str] | None = None
_warned: set[str] = set()


# ------------------------------------------------------------------------------- the probe graph
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value: bytes | str | int) -> bytes:
    """One protobuf field: varint for ints, length-delimited for bytes/str."""
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def probe_model_bytes(opset: int = 17, ir_version: int = 8) -> bytes:
    """A serialized ONNX ModelProto: float32 x [1] -> Add(x, x) -> y [1]."""
    def value_info(name: str) -> bytes:
        dim = _field(1, _field(1, 1))  # TensorShapeProto.dim { dim_value: 1 }
        tensor = _field(1, 1) + _field(2, dim)  # elem_type FLOAT, shape
        return _field(1, name) + _field(2, _field(1, tensor))  # name, type { tensor_type }

    node = _field(1, "x") + _field(1, "x") + _field(2, "y") + _field(3, "probe_add") + _field(4, "Add")
    graph = _field(1, node) + _field(2, "cuda_probe") + _field(11, value_info("x")) + _field(12, value_info("y"))
    opset_id = _field(1, "") + _field(2, opset)
    return _field(1, ir_version) + _field(2, "parscale-edge") + _field(7, graph) + _field(8, opset_id)


# ---------------------------------------------------------------------------------------- probe
@contextlib.contextmanager
def _stderr_to(buf: list[str]):
    """Send file descriptor 2 (where ONNX Runtime's C++ logger writes) to a temporary file for the
    duration; its text is appended to ``buf``. Leaves stderr alone where fd 2 cannot be duplicated."""
    import os
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.append(tmp.read().decode("utf-8", "replace"))


def _reason_from_log(text: str) -> str:
    """The most telling line of ONNX Runtime's log about a failed CUDA provider (missing library...)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in text.splitlines() if ln.strip()]
    for key in ("cannot open shared object", "Failed to load library", "Require cuDNN", "CUDA failure", "Failed"):
        for ln in lines:
            if key in ln:
                return re.sub(r"^[:\s]*\d+\s*:\s*FAIL\s*:\s*", "", ln.split("] ")[-1])[:300]
    return lines[-1][-300:] if lines else ""


def _probe_cuda() -> tuple[bool, str]:
    """Run the probe graph on the CUDA provider. Returns (works, reason when it does not)."""
    import numpy as np
    import onnxruntime as ort

    captured = io.StringIO()
    log: list[str] = []
    try:
        with contextlib.redirect_stdout(captured), warnings.catch_warnings(), _stderr_to(log):
            warnings.simplefilter("ignore")
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip packages, if any
                try:
                    ort.preload_dlls()
                except Exception:  # noqa: BLE001 - the session below says whether CUDA works
                    pass
            so = ort.SessionOptions()
            so.log_severity_level = 4
            sess = ort.InferenceSession(probe_model_bytes(), so, providers=[(CUDA, CUDA_OPTIONS), CPU])
            ok = sess.get_providers()[0] == CUDA
            y = sess.run(None, {"x": np.array([1.5], dtype=np.float32)})[0] if ok else None
    except Exception as e:  # noqa: BLE001 - any failure means: do not use CUDA
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        logged = _reason_from_log("".join(log))
        return False, f"{type(e).__name__}: {first}" + (f" ({logged})" if logged else "")
    if not ok:
        detail = _reason_from_log("".join(log)) or captured.getvalue().strip()[-200:]
        return False, ("the CUDA provider could not be created: the driver, CUDA or cuDNN libraries that this "
                       f"onnxruntime-gpu needs are missing or mismatched ({detail or 'no detail logged'})")
    if y.shape != (1,) or float(y[0]) != 3.0:
        return False, f"the CUDA provider computed 1.5 + 1.5 = {y.ravel()[:1]}"
    return True, ""


def cuda_status(refresh: bool = False) -> tuple[bool, str]:
    """(True, "") when this onnxruntime lists the CUDA provider and a probe session runs on it;
    else (False, why). Cached per process (``refresh`` probes again)."""
    global _status
    if _status is None or refresh:
        import onnxruntime as ort

        if CUDA not in ort.get_available_providers():
            _status = (False, _no_cuda_reason())
        else:
            _status = _probe_cuda()
    return _status


def _no_cuda_reason() -> str:
    from importlib import metadata

    names = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            names.add(dist)
        except metadata.PackageNotFoundError:
            pass
    if names == {"onnxruntime", "onnxruntime-gpu"}:
        return ("onnxruntime and onnxruntime-gpu are both installed and share one module; reinstall the GPU one "
                "alone: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    return "this onnxruntime has no CUDAExecutionProvider (pip install 'parscale-edge[gpu]', see README: Install)"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def select(device: str = "auto") -> list:
    """Execution providers for ``device``: a list to pass to ``onnxruntime.InferenceSession``.

    * ``cpu``: ``["CPUExecutionProvider"]``.
    * ``auto``: ``[("CUDAExecutionProvider", CUDA_OPTIONS), "CPUExecutionProvider"]`` when
      :func:`cuda_status` says CUDA works; else CPU, with one warning per process when a CUDA
      provider was listed but failed the probe (a CPU-only onnxruntime gives no warning: CPU
      is all it has).
    * ``cuda``: CUDA when it works; else CPU with one warning per process.

    Raises ValueError for another device name.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu":
        return [CPU]
    works, why = cuda_status()
    if works:
        return [(CUDA, dict(CUDA_OPTIONS)), CPU]
    import onnxruntime as ort

    if device == "cuda" or CUDA in ort.get_available_providers():
        _warn_once("cpu-fallback", f"CUDA {'was requested' if device == 'cuda' else 'is listed'} but does not work "
                                   f"here ({why}); running on CPU")
    return [CPU]


def provider_name(entry) -> str:
    """The provider name of one :func:`select` entry (a name, or a (name, options) pair)."""
    return entry[0] if isinstance(entry, tuple) else entry


def _reset_for_tests() -> None:
    """Forget the cached probe and the warnings already given (tests only)."""
    global _status
    _status = None
    _warned.clear()


__all__ = ["CUDA", "CPU", "DEVICES", "CUDA_OPTIONS", "cuda_status", "probe_model_bytes", "provider_name", "select"]
