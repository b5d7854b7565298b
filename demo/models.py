"""The two models of the demo: which ones by default, how they are exported, cached and loaded.

No gradio and no torch at import time: ``parscale demo --help`` reads :data:`DEFAULTS` from here.
A model that needs exporting goes through :func:`parscale_edge.prepare.ensure_export` (cached fp32
export, P conversion included) and, for int4/int8, :func:`parscale_edge.quant.onnx_quant.quantize_folder`
with its default settings into the cache folder of that precision
(:func:`parscale_edge.prepare.export_cache_folder`), so the demo, ``parscale chat -P 2`` and
``parscale export --precision`` share one cache and one way of making a model.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path

PRECISIONS = ("fp32", "int8", "int4")


#: The controlled comparison of the shipped adapters (README "Does ParScale help, or is it prefix
#: tuning?"; ``bench/adapter_eval.py --compare``): the demo labels its left model with what it shows.
COMPARISON_JSON = Path(__file__).resolve().parent.parent / "bench" / "results" / "prefix_vs_parscale.json"

#: The trained smollm2-135m adapters shipped in the repository (``parscale train``, README): P=2, P=4.
SHIPPED_ADAPTERS = tuple(str(Path(__file__).resolve().parent.parent / "adapters" / f"smollm2-135m-p{P}.safetensors")
                         for P in (2, 4))


@dataclass(frozen=True)
class DemoDefaults:
    """The default pair; change the left model here and nowhere else.

    ``left_parallel``: the P the left model offers, all over one backbone (one fused export folder,
    a small ParScale part file per P > 1; a P control in the demo picks one per answer). The first
    listed is the one selected at start. ``left_adapters``: trained ParScale parts for some of those
    P (the shipped P=2 and P=4 adapters the checkout has; a P > 1 without one is an untrained
    conversion). ``right_parallel``: the same for the right model. ``parscale demo --help`` shows
    these from :data:`parscale_edge.cli.DEMO_DEFAULTS_HELP` (a test keeps the two the same)."""

    left: str = "smollm2-135m"
    left_parallel: tuple[int, ...] = (2, 1, 4)
    left_adapters: tuple[str, ...] = tuple(a for a in SHIPPED_ADAPTERS if Path(a).exists())
    right: str = "qwen2.5-coder-0.5b"
    right_parallel: tuple[int, ...] = (1,)
    precision: str = "int4"


DEFAULTS = DemoDefaults()


def _rss_mib() -> float | None:
    """This process's resident set (VmRSS, MiB); None where /proc is not readable."""
    from parscale_edge.profile import proc_status_mib

    return proc_status_mib("VmRSS")


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op
    elsewhere), so that an RSS reading reflects live memory. Without it, an export or quantization
    just run in this process leaves hundreds of MiB of freed pages that loading then reuses or
    releases, and the RSS growth over loading a model came out negative on a first start."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def prepare_model(spec: str, parallel: int | Sequence[int] | None, precision: str, threads: int | None = None,
                  progress: bool = True, log=print, adapters: Sequence[str] = ()) -> Path:
    """The export folder to run for ``spec``: ``spec`` itself when it is an export folder (used as
    it is, whatever ``precision`` says; it must offer every P in ``parallel``), else the cached fp32
    export (several P: one fused backbone with a ParScale part file per P > 1), quantized once to
    ``precision`` into :func:`parscale_edge.prepare.export_cache_folder` of that precision (default
    :class:`parscale_edge.quant.onnx_quant.QuantConfig`, its accuracy-level check on, the fp32 comparison skipped;
    the part files stay float32). A current quantized folder is used without touching the fp32 one.

    Raises PrepareError (ParallelError for a P out of range or not offered) / UnsupportedModelError /
    ManifestError / QuantizationError for a model that cannot be found, converted or quantized
    (one-line messages)."""
    from parscale_edge.manifest import FORMAT_VERSION, MANIFEST_FILE, Manifest
    from parscale_edge.prepare import (PrepareError, ensure_export, export_cache_folder, import_quant_stack,
                                       is_export_folder)

    if precision not in PRECISIONS:
        raise PrepareError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if is_export_folder(spec):
        return ensure_export(spec, parallel)  # checks every P against the folder's manifest
    if precision == "fp32":
        return ensure_export(spec, parallel, threads, progress=progress, adapters=adapters)
    out = export_cache_folder(spec, parallel, precision, adapters)
    if (out / MANIFEST_FILE).exists():
        man = Manifest.read(out)
        if man.precision == precision and man.format_version == FORMAT_VERSION:
            return out  # the fp32 export is not needed, nor touched
    fp32 = ensure_export(spec, parallel, threads, progress=progress, adapters=adapters)
    import_quant_stack()
    from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder

    from parscale_edge.atomic import folder_size_mib

    gib = folder_size_mib(fp32) / 1024  # measured: about 0.4 min per GiB of fp32 weights on 2 cores (1.5B: 2.5 min)
    log(f"quantizing {fp32.name} ({gib:.1f} GiB) to {precision} once, cached in {out}: roughly "
        f"{max(1, round(0.4 * gib))} minute(s) without a progress bar ...")
    t0 = time.perf_counter()
    quantize_folder(fp32, out, QuantConfig(precision=precision), overwrite=True, compare_positions=0,
                    threads=threads)
    log(f"quantized in {time.perf_counter() - t0:.1f} s")
    return out


@dataclass
class DemoModel:
    """One pane's model, or why it is missing.

    ``runtime`` is an :class:`parscale_edge.runtime.OnnxCausalLM` or None when loading failed (``error`` then
    says why, in one line). ``parallel_choices``: the P this pane offers (one backbone; a fused folder
    can serve several, each answer picks one); ``P``: the one selected at start. ``resident_mib``:
    growth of this process's RSS over creating the ONNX Runtime session, a one-token warm-up at every
    offered P (which loads each P's ParScale parts) and loading the tokenizer (MiB; onnxruntime and
    tokenizers are imported before, so their libraries are not counted); ``resident_how`` says how
    it was measured; ``file_mib``: graph + weights + the offered P's part files (MiB);
    ``parts_mib``: the ParScale part files of the offered P (prefixes and aggregators, float32, MiB);
    ``prefix``: KV cache slots the prefix takes per stream, by P."""

    label: str
    spec: str
    runtime: object | None = None
    folder: Path | None = None
    error: str | None = None
    resident_mib: float | None = None
    resident_how: str = ""
    file_mib: float | None = None
    parts_mib: float = 0.0
    load_s: float | None = None
    parallel_choices: list[int] = field(default_factory=list)
    prefix: dict[int, int] = field(default_factory=dict)
    adapters: tuple[str, ...] = ()  # trained ParScale parts this pane's export was made with

    @property
    def ok(self) -> bool:
        return self.runtime is not None

    @property
    def P(self) -> int | None:
        """The P selected at start (the runtime's default)."""
        return self.runtime.P if self.runtime is not None else None

    @property
    def precision(self) -> str | None:
        return self.runtime.manifest.precision if self.runtime is not None else None


def load_demo_model(label: str, spec: str, parallel: int | Sequence[int] | None, precision: str,
               threads: int | None = None, device: str = "cpu", progress: bool = True, log=print,
               adapters: Sequence[str] = ()) -> DemoModel:
    """Export if needed, load into ONNX Runtime and measure what it costs to keep resident.

    ``parallel``: the P to offer (a sequence: several over one backbone, the first selected at
    start); None: every P of an export folder, starting at its default. ``adapters``: trained
    ParScale parts for some of those P (the others are conversions). Never raises for a model
    that cannot be prepared or loaded: the returned model has ``error`` set (one line), so the demo
    shows it in that model's pane and the other pane still works. Load the models one after the
    other: the RSS growth is only attributable to one model at a time."""
    import numpy as np

    from parscale_edge.profile import folder_bytes
    from parscale_edge.runtime import OnnxCausalLM

    lm = DemoModel(label=label, spec=spec, adapters=tuple(str(a) for a in adapters))
    asked = [int(parallel)] if isinstance(parallel, (int, np.integer)) else list(dict.fromkeys(parallel or []))
    try:
        folder = Path(prepare_model(spec, asked or None, precision, threads, progress, log, adapters=adapters))
        import onnxruntime  # noqa: F401 - libraries loaded before measuring: their pages are not the model's
        import tokenizers  # noqa: F401

        _release_freed_memory()
        before = _rss_mib()
        t0 = time.perf_counter()
        rt = OnnxCausalLM(folder, device=device, threads=threads, parallel=asked[0] if asked else None)
        options = sorted(asked) if asked else list(rt.parallel_choices)
        for P in options:  # warm-up: weights paged in, arenas sized, every offered P's parts loaded
            rt.score(np.ones((1, 1), np.int64), parallel=P)
        rt.tokenizer  # noqa: B018 - loaded now: it is part of what the model keeps resident
        lm.load_s = time.perf_counter() - t0
        _release_freed_memory()
        after = _rss_mib()
        lm.runtime, lm.folder, lm.parallel_choices = rt, folder, options
        lm.prefix = {P: rt.prefix_slots(P) for P in options}
        parts = [rt.manifest.part_file(P) for P in options]
        lm.parts_mib = sum((folder / f).stat().st_size for f in parts if f) / 2**20
        lm.file_mib = folder_bytes(folder) / 2**20 + lm.parts_mib
        if before is not None and after is not None and after > before:
            lm.resident_mib, lm.resident_how = after - before, ("RSS growth over loading it (session, one-token warm-up "
                                                                "at each P, tokenizer)")
        elif before is None or after is None:
            lm.resident_mib, lm.resident_how = lm.file_mib, "weight file size (RSS not readable here)"
        else:  # other memory of this process was released while loading: the growth says nothing
            lm.resident_mib, lm.resident_how = lm.file_mib, "weight file size (RSS fell while loading it)"
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


def load_pair(left: str, left_parallel: int | Sequence[int] | None, right: str,
              right_parallel: int | Sequence[int] | None, precision: str, threads: int | None = None,
              device: str = "cpu", progress: bool = True, log=print) -> tuple[DemoModel, DemoModel]:
    """Prepare (export, quantize: cached after the first start) and load the two models one after
    the other, logging each stage as ``[k/2] ...``. ``*_parallel``: the P each side offers (first
    selected at start); None: :data:`DEFAULTS` for a model the demo exports (left P 2, 1, 4 over one
    backbone, right P 1), every P of an export folder."""
    from parscale_edge.prepare import is_export_folder

    out = []
    started = start_onnxruntime()
    for k, (label, spec, P, default_P) in enumerate((("left", left, left_parallel, DEFAULTS.left_parallel),
                                                     ("right", right, right_parallel, DEFAULTS.right_parallel)), 1):
        if P is None and not is_export_folder(spec):
            P = default_P
        if is_export_folder(spec):
            log(f"[{k}/2] {label}: loading {spec} ...")
        else:
            Ps = ", ".join(map(str, [P] if isinstance(P, int) else sorted(P)))
            log(f"[{k}/2] {label}: {spec}, P={Ps}, {precision} (exported and quantized into the cache on the first "
                "start, minutes; later starts reuse it) ...")
        adapters = DEFAULTS.left_adapters if (label, spec) == ("left", DEFAULTS.left) and P is not None else ()
        if adapters:
            log(f"      trained ParScale parts from {', '.join(Path(a).name for a in adapters)}; a P > 1 without "
                "an adapter is an untrained conversion")
        lm = load_demo_model(label, spec, P, precision, threads, device, progress, log, adapters=adapters)
        if lm.ok and k == 1 and not started:
            lm.resident_how += " (includes ONNX Runtime's one-time start-up, about 10 MiB)"
        if lm.ok:
            parts = f" (ParScale parts {lm.parts_mib:.1f} MiB)" if lm.parts_mib else ""
            log(f"[{k}/2] {label}: loaded {lm.folder} in {lm.load_s:.1f} s: P={lm.P} of "
                f"{', '.join(map(str, lm.parallel_choices))}, {lm.precision}, resident {lm.resident_mib:.0f} MiB, "
                f"file {lm.file_mib:.0f} MiB{parts}")
        else:
            log(f"[{k}/2] {label}: failed: {lm.error}")
        out.append(lm)
    return out[0], out[1]


def adapter_verdict(path: str | os.PathLike = COMPARISON_JSON, text: str = "code") -> str | None:
    """One line saying what the trained adapters measured on held-out ``text`` (``code`` or
    ``prose``) against the dense parent and against prefix tuning (the P=1 prefix-only control of the
    same data and budget), from the comparison JSON of ``bench/adapter_eval.py --compare``; None when
    there is none (or it holds no control arm). Perplexity ratios of the seed means, e.g. ``P=2:
    -1.1% vs dense, +0.2% vs prefix tuning (within seed spread)``."""
    import json

    try:
        summary = json.loads(Path(path).read_text()).get("summary") or []
    except (OSError, ValueError):
        return None
    rows = [r for r in summary if r.get("text") == text]
    if not any(r["arm"] == "P=1 prefix only" for r in rows):
        return None
    parts = []
    for r in rows:
        if r["arm"] == "P=1 prefix only":
            parts.append(f"prefix tuning (P=1) {r['vs_dense']:+.1%} vs dense")
            continue
        spread = {True: "beyond seed spread", False: "within seed spread", None: "one seed"}[r.get("beyond_spread")]
        parts.append(f"{r['arm']} {r['vs_dense']:+.1%} vs dense, {r['vs_control']:+.1%} vs prefix tuning ({spread})")
    return f"held-out {text} perplexity, trained adapters: " + "; ".join(parts)
