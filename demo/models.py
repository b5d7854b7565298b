"""The two models of the demo: which ones by default, how they are exported, cached and loaded.

No gradio and no torch at import time: ``parscale demo --help`` reads :data:`DEFAULTS` from here.
A model that needs exporting goes through the CLI's own :func:`edge.cli.ensure_export` (cached fp32
export, ``-P`` conversion included) and, for int4/int8, :func:`quant.onnx_quant.quantize_folder`
with its default settings into a sibling cache folder, so the demo, ``parscale chat -P 2`` and
``parscale export --precision`` share one cache and one way of making a model.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class DemoDefaults:
    """The default pair. ``left_parallel`` streams are a conversion of the dense checkpoint (untrained
    streams) until a trained ParScale adapter lands; change the left model here and nowhere else."""

    left: str = "smollm2-135m"
    left_parallel: int = 2
    right: str = "qwen2.5-coder-0.5b"
    right_parallel: int = 1
    precision: str = "int4"


DEFAULTS = DemoDefaults()


def _rss_mib() -> float | None:
    """This process's resident set (VmRSS, MiB); None where /proc is not readable."""
    from edge.profile import _proc_status_mib

    return _proc_status_mib("VmRSS")


def prepare_model(spec: str, parallel: int | None, precision: str, threads: int | None = None,
                  progress: bool = True, log=print) -> Path:
    """The export folder to run for ``spec``: ``spec`` itself when it is an export folder (used as
    it is, whatever ``precision`` says), else the cached fp32 export with ``parallel`` streams,
    quantized once to ``precision`` into ``<cache>/onnx/<name>-<precision>`` (default
    :class:`quant.onnx_quant.QuantConfig`, its accuracy-level check on, the fp32 comparison skipped).

    Raises CLIError / UnsupportedModelError / ManifestError / QuantizationError for a model that
    cannot be found, converted or quantized (one-line messages)."""
    from edge.cli import CLIError, _is_export_folder, _import_quant_stack, ensure_export
    from edge.manifest import MANIFEST_FILE, Manifest

    if precision not in PRECISIONS:
        raise CLIError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if _is_export_folder(spec):
        return ensure_export(spec, parallel)  # checks P against the folder's manifest
    fp32 = ensure_export(spec, parallel, threads, progress=progress)
    if precision == "fp32":
        return fp32
    out = fp32.with_name(fp32.name.removesuffix("-fp32") + f"-{precision}")
    if (out / MANIFEST_FILE).exists() and Manifest.read(out).precision == precision:
        return out
    _import_quant_stack()
    from quant.onnx_quant import QuantConfig, quantize_folder

    log(f"quantizing {fp32.name} to {precision} (once; cached in {out}) ...")
    t0 = time.perf_counter()
    quantize_folder(fp32, out, QuantConfig(precision=precision), overwrite=True, compare_positions=0,
                    threads=threads)
    log(f"quantized in {time.perf_counter() - t0:.1f} s")
    return out


@dataclass
class LoadedModel:
    """One pane's model, or why it is missing.

    ``runtime`` is an :class:`edge.runtime.OnnxCausalLM` or None when loading failed (``error`` then
    says why, in one line). ``resident_mib``: growth of this process's RSS over creating the ONNX
    Runtime session, a one-token warm-up and loading the tokenizer (MiB; onnxruntime and tokenizers
    are imported before, so their libraries are not counted); ``resident_how`` says how it was
    measured; ``file_mib``: model.onnx + its data file (MiB)."""

    label: str
    spec: str
    runtime: object | None = None
    folder: Path | None = None
    error: str | None = None
    resident_mib: float | None = None
    resident_how: str = ""
    file_mib: float | None = None
    load_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.runtime is not None

    @property
    def P(self) -> int | None:
        return self.runtime.P if self.runtime is not None else None

    @property
    def precision(self) -> str | None:
        return self.runtime.manifest.precision if self.runtime is not None else None

    def kv_mib(self, tokens: int) -> float:
        """KV cache of one answer of ``tokens`` positions, MiB: 2 (k, v) * layers * P * kv_heads *
        head_dim * tokens * 4 bytes (float32)."""
        m = self.runtime.manifest
        return 2 * m.num_layers * m.parscale_n * m.num_key_value_heads * m.head_dim * tokens * 4 / 2**20


def load_model(label: str, spec: str, parallel: int | None, precision: str, threads: int | None = None,
               device: str = "cpu", progress: bool = True, log=print) -> LoadedModel:
    """Export if needed, load into ONNX Runtime and measure what it costs to keep resident.

    Never raises for a model that cannot be prepared or loaded: the returned model has ``error``
    set (one line), so the demo shows it in that model's pane and the other pane still works.
    Load the models one after the other: the RSS growth is only attributable to one model at a time."""
    import numpy as np

    from edge.profile import folder_bytes
    from edge.runtime import OnnxCausalLM

    lm = LoadedModel(label=label, spec=spec)
    try:
        folder = prepare_model(spec, parallel, precision, threads, progress, log)
        import onnxruntime  # noqa: F401 - libraries loaded before measuring: their pages are not the model's
        import tokenizers  # noqa: F401

        before = _rss_mib()
        t0 = time.perf_counter()
        rt = OnnxCausalLM(folder, device=device, threads=threads)
        rt.score(np.ones((1, 1), np.int64))  # warm-up: weights paged in, arenas sized
        rt.tokenizer  # noqa: B018 - loaded now: it is part of what the model keeps resident
        lm.load_s = time.perf_counter() - t0
        after = _rss_mib()
        lm.runtime, lm.folder = rt, Path(folder)
        lm.file_mib = folder_bytes(folder) / 2**20
        if before is not None and after is not None:
            lm.resident_mib, lm.resident_how = after - before, "RSS growth over loading it (session, one-token warm-up, tokenizer)"
        else:
            lm.resident_mib, lm.resident_how = lm.file_mib, "weight file size (RSS not readable here)"
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any failure belongs in the pane, not in a traceback
        lm.error = " ".join(str(e).split()) or type(e).__name__
        if os.environ.get("PARSCALE_DEMO_DEBUG"):
            traceback.print_exc()
    return lm


def start_onnxruntime() -> bool:
    """Create and run a one-node ONNX Runtime session, so that ORT's one-time start-up (about 10 MiB
    of kernel registry and allocator) is not counted as the first model's resident memory. Needs
    the ``onnx`` package (the quant/export extras); returns False without it."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return False
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "start", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones(1, np.float32)})
    return True


def load_pair(left: str, left_parallel: int | None, right: str, right_parallel: int | None, precision: str,
              threads: int | None = None, device: str = "cpu", progress: bool = True,
              log=print) -> tuple[LoadedModel, LoadedModel]:
    """Prepare (export, quantize: cached after the first start) and load the two models one after
    the other, logging each stage as ``[k/2] ...``. ``*_parallel`` None: :data:`DEFAULTS` for a
    model the demo exports (left P=2, right P=1), the folder's own P for an export folder."""
    from edge.cli import _is_export_folder

    out = []
    started = start_onnxruntime()
    for k, (label, spec, P, default_P) in enumerate((("left", left, left_parallel, DEFAULTS.left_parallel),
                                                     ("right", right, right_parallel, DEFAULTS.right_parallel)), 1):
        if P is None and not _is_export_folder(spec):
            P = default_P
        if _is_export_folder(spec):
            log(f"[{k}/2] {label}: loading {spec} ...")
        else:
            log(f"[{k}/2] {label}: {spec}, P={P}, {precision} (exported and quantized into the cache on the first "
                "start, minutes; later starts reuse it) ...")
        lm = load_model(label, spec, P, precision, threads, device, progress, log)
        if lm.ok and k == 1 and not started:
            lm.resident_how += " (includes ONNX Runtime's one-time start-up, about 10 MiB)"
        if lm.ok:
            log(f"[{k}/2] {label}: loaded {lm.folder} in {lm.load_s:.1f} s: P={lm.P}, {lm.precision}, "
                f"resident {lm.resident_mib:.0f} MiB, file {lm.file_mib:.0f} MiB")
        else:
            log(f"[{k}/2] {label}: failed: {lm.error}")
        out.append(lm)
    return out[0], out[1]
