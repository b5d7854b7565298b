"""From a model spec to an export folder: load, convert to P streams, export once into the cache.

A model spec is an export folder (used as it is), a named model (``smollm2-135m``, see
:data:`parscale_edge.hub.MODELS`), a ``.gguf`` file or a Hugging Face folder; anything but an
export folder is exported once into ``<cache>/onnx/`` and reused. The command line, the demo, the
profiler and ``bench/`` all prepare models here, so they share one cache and one naming scheme
(:func:`cache_name`)::

    <source>[-p<P>[-<P>...]][-a<adapters' hash>]-<precision>[-<variant>]

``<source>`` is the named model, or ``<file or folder name>-<hash of its inputs>`` (so an edited
source is exported again); ``<variant>`` marks a derived folder made with other settings (the
profiler's cost-only quantization ``-cost``, its random dense twins ``-dense-twin-L<layers>``).

P, the number of parallel streams, is called ``parallel`` here: an int, or a list of ints where
one backbone serves several P (config.json keeps the on-disk name ``parscale_n``). Errors are
:class:`PrepareError` (a ValueError); those about P are :class:`ParallelError`, whose message a
caller can phrase with its own name for P (:meth:`ParallelError.naming`, e.g. a CLI flag).

torch and onnx are imported only by the functions that load or export a checkpoint (the
``export`` extra); everything that only reads an export folder stays torch-free.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .manifest import MANIFEST_FILE, Manifest

#: precisions an export is made in directly; int4/int8 are quantized from an fp32 export
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")


class PrepareError(ValueError):
    """A model cannot be prepared as asked: a missing dependency, a non-dense model asked to convert,
    two adapters of one P, an unknown precision."""


class ParallelError(PrepareError):
    """P (or a list of P) unreadable, out of range, or not offered by an export folder.

    ``str()`` calls it P; :meth:`naming` phrases the same message with another name for it (the
    CLI passes its flag, ``--parallel``)."""

    def __init__(self, template: str, **values) -> None:
        self.template, self.values = template, values
        super().__init__(self.naming("P"))

    def naming(self, name: str) -> str:
        """The message with ``name`` where it says P (``{name}`` in the template)."""
        return self.template.format(name=name, **self.values)


# --------------------------------------------------------------------------------------------- P
def parse_parallel(text: str | int) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (order kept; an int -> ``[int]``). Raises ParallelError for text
    that is not comma-separated integers, or an integer below 1 (the upper bound is
    :func:`check_parallel`'s)."""
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ParallelError("{name} takes comma-separated integers, got {text!r}", text=str(text)) from None
    if not vals or min(vals) < 1:
        raise ParallelError("{name} needs positive integers, got {text!r}", text=str(text))
    return vals


def check_parallel(parallel: int | Sequence[int] | None) -> None:
    """Raises ParallelError for a P below 1 or above :data:`parscale_edge.config.MAX_PARALLEL`
    (checked before any slow work); None passes (the model's own P)."""
    from .config import MAX_PARALLEL

    for P in parallel if isinstance(parallel, Sequence) else [parallel]:
        if P is None:
            continue
        if P < 1:
            raise ParallelError("{name} must be >= 1, got {P}", P=P)
        if P > MAX_PARALLEL:
            raise ParallelError("{name} {P} is above the supported {max}: every stream adds its own prefix to every "
                                "layer (a part file growing with P) and P multiplies the KV cache and the compute of "
                                "every token; the paper uses P <= 8", P=P, max=MAX_PARALLEL)


def normalize_parallel(parallel: int | Sequence[int] | None, adapters: Sequence = ()) -> int | list[int] | None:
    """The P to prepare: None (the model's own), one int, or a sorted list of two or more (one
    backbone for all); a one-element list is that int. With ``adapters`` the backbone's P=1 is always
    offered beside the adapters' P. Raises ParallelError for a P out of range."""
    if adapters:
        parallel = [parallel] if isinstance(parallel, int) else list(parallel or []) or [1]
        if parallel != [1]:
            parallel = [1, *parallel]  # the adapter's P over the backbone: keep the P=1 option with it
    if isinstance(parallel, Sequence):
        parallel = sorted(set(parallel))
        if len(parallel) == 1:
            parallel = parallel[0]
    check_parallel(parallel)
    return parallel


def fused_parallel(spec: str, parallel: int | None) -> int | None:
    """The P to run ``spec`` at once prepared: ``parallel`` for an export folder (which may offer
    several), None for a folder prepared here (made for exactly that P: run its default)."""
    return parallel if parallel and is_export_folder(spec) else None


# ----------------------------------------------------------------------------------- model specs
def is_export_folder(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` is a folder made by the exporter (it holds a manifest)."""
    return (Path(spec) / MANIFEST_FILE).exists()


def named_models() -> set[str]:
    """The named models (:data:`parscale_edge.hub.MODELS`)."""
    from .hub import MODELS

    return set(MODELS)


def import_export_stack() -> None:
    """Raises PrepareError when PyTorch or onnx (the ``export`` extra) is missing."""
    try:
        import torch  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as e:
        raise PrepareError(f"this step loads a checkpoint and exports it, which needs PyTorch and onnx ({e.name} is "
                           "missing): pip install 'parscale-edge[export]', or pass a folder made by `parscale export`"
                           ) from None


def import_quant_stack() -> None:
    """Raises PrepareError when onnx or onnx-ir (the ``quant`` extra) is missing."""
    try:
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
    except ImportError as e:
        raise PrepareError(f"quantization needs onnx and onnx-ir ({e.name} is missing): "
                           "pip install 'parscale-edge[quant]'") from None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- cache
def input_stamps(p: Path) -> list[str]:
    """What an export of the file or folder ``p`` depends on: its path and, for the file or each file
    in the folder (weights, config, tokenizer, chat template; links followed), name, size, mtime and
    inode, plus the content hash of files under 16 MiB (config and tokenizer files: cheap to read).
    Replacing or editing any of them in place changes the stamps, so the cache exports again."""
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    stamps = [str(p)]
    for f in files:
        st = f.stat()
        stamp = f"{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        if st.st_size < 16 * 2**20:
            stamp += ":" + hashlib.sha256(f.read_bytes()).hexdigest()
        stamps.append(stamp)
    return stamps


def source_key(spec: str) -> str:
    """The ``<source>`` part of a cache name: a named model's id, else ``<stem>-<12 hex digits>`` of
    :func:`input_stamps`. Raises FileNotFoundError / ValueError for a spec that is no model
    (:func:`parscale_edge.hub.resolve_model`)."""
    from .hub import resolve_model

    kind, ref = resolve_model(spec)
    if kind == "named":
        return ref
    p = Path(ref).resolve()
    return f"{p.stem or p.name}-{hashlib.sha256('|'.join(input_stamps(p)).encode()).hexdigest()[:12]}"


def cache_name(source: str, parallel: int | Sequence[int] | None = None, precision: str = "fp32",
               adapters: Sequence[str | os.PathLike] = (), variant: str = "") -> str:
    """The one cache folder name: ``<source>[-p<P>[-<P>...]][-a<hash>]-<precision>[-<variant>]``,
    e.g. ``smollm2-135m-p1-2-4-a1b2c3d4e5-int4`` (the P ascending; ``a``: 10 hex digits of the
    adapter files' SHA-256)."""
    name = source
    if isinstance(parallel, Sequence):
        parallel = "-".join(str(P) for P in sorted(set(parallel)))
    if parallel:
        name += f"-p{parallel}"
    if adapters:
        from .hub import sha256_file

        name += "-a" + hashlib.sha256("".join(sha256_file(a) for a in adapters).encode()).hexdigest()[:10]
    return f"{name}-{precision}" + (f"-{variant}" if variant else "")


def cache_root() -> Path:
    """``<cache>/onnx``: where prepared export folders live (``PARSCALE_EDGE_CACHE`` moves it)."""
    from .hub import default_cache_dir

    return Path(default_cache_dir()) / "onnx"


def export_cache_folder(spec: str, parallel: int | Sequence[int] | None = None, precision: str = "fp32",
                        adapters: Sequence[str | os.PathLike] = (), variant: str = "") -> Path:
    """Where ``spec`` (not an export folder) is cached for these P, precision, adapters and variant
    (:func:`cache_name`; a named model without P is named for its P=1). Raises ParallelError for a
    P out of range."""
    parallel = normalize_parallel(parallel, adapters)
    if parallel is None and spec in named_models():
        parallel = 1
    return cache_root() / cache_name(source_key(spec), parallel, precision, adapters, variant)


def variant_folder(folder: str | os.PathLike, precision: str, variant: str = "") -> Path:
    """The folder beside the cached export ``folder`` for the same source, P and adapters in another
    ``precision`` and ``variant`` (the name's ``-<precision>`` part replaced: :func:`cache_name`)."""
    folder = Path(folder)
    src_precision = Manifest.read(folder).precision
    name = folder.name.replace(f"-{src_precision}", "")
    return folder.with_name(f"{name}-{precision}" + (f"-{variant}" if variant else ""))


def say_load_warnings(man: Manifest) -> None:
    """The warnings the source gave when it was exported (e.g. an unknown GGUF pre-tokenizer), again on
    every use of the export (stderr): they still apply, and the first run may have been long ago."""
    for msg in man.extra.get("load_warnings") or []:
        _log(f"warning: {msg}")


# ------------------------------------------------------------------------------- load and export
def load_for_export(spec: str, parallel: int | None, threads: int | None, progress: bool = True, seed: int = 0):
    """Load ``spec`` into PyTorch (a :class:`parscale_edge.loading.LoadedModel`); convert a dense
    model to ``parallel`` streams when asked (trained adapters go through :func:`load_several`).

    Raises ParallelError for a P out of range or a non-dense model asked to convert, PrepareError
    without PyTorch, and what :func:`parscale_edge.loading.load_model` raises for a bad source."""
    check_parallel(parallel)
    import_export_stack()
    from .loading import convert_to_parscale, load_model, set_torch_threads

    set_torch_threads(threads)
    lm = load_model(spec, progress=progress)
    if lm.tokenizer is None:
        _log(f"warning: {spec} has no tokenizer.json: the export runs on token ids only, and generate, chat and "
             "eval will refuse it; copy tokenizer.json (and tokenizer_config.json) into the model folder first")
    P = lm.model.config.parscale_n
    if parallel and parallel != P:
        if P != 1:
            raise ParallelError("{spec} already has P={has} streams; {name} {P} needs a dense (P=1) model",
                                spec=spec, has=P, P=parallel)
        lm = convert_to_parscale(lm, parallel, seed=seed)
    return lm


def load_several(spec: str, parallel: Sequence[int] | None, threads: int | None, progress: bool = True,
                 adapters: Sequence[str | os.PathLike] = ()):
    """(first model, the others): the dense ``spec`` as P = ``parallel[0]`` and, for the other P,
    the trained adapter of that P when ``adapters`` has one (``parscale train``), else its
    conversion; all over one backbone (``export_model(first, out, extra_parallel=others)`` writes one folder
    that serves every P). ``parallel`` None: the adapters' P in their order, then P=1 (the backbone;
    a prefix-only adapter, the P=1 prefix-tuning control, takes the P=1 place instead).
    Raises PrepareError when ``spec`` is not dense (P=1) or two adapters share a P, AdapterError for an
    adapter of another backbone (for a named model whose adapter names another named model, before
    anything is downloaded)."""
    from .loading import convert_to_parscale

    # bad adapter files, and a named model's adapter trained on another named model, are refused
    # from their headers before the (slow) load or download
    from .adapter import AdapterError, adapter_metadata

    named = named_models()
    for f in adapters:
        source = adapter_metadata(f)["source"]
        if spec in named and source in named and source != spec:
            raise AdapterError(f"{f}: this adapter was trained on {source}, not {spec}; export {source} "
                               "with it (nothing was downloaded)")
    dense = load_for_export(spec, None, threads, progress=progress)
    if dense.model.config.parscale_n != 1:
        raise PrepareError(f"several P over one backbone need a dense (P=1) model; {spec} has "
                           f"P={dense.model.config.parscale_n}")
    trained = {}
    if adapters:
        from .adapter import apply_adapter, backbone_sha256

        digest = backbone_sha256(dense.model)  # once for every adapter
        for m in (apply_adapter(dense, f, backbone_hash=digest) for f in adapters):
            P = m.model.config.parscale_n
            if P in trained:
                raise PrepareError(f"two adapters with P={P}; give one per P")
            trained[P] = m
    parallel = parallel or list(dict.fromkeys([*trained, 1]))
    models = [trained.get(P) or (dense if P == 1 else convert_to_parscale(dense, P)) for P in parallel]
    return models[0], models[1:]


def export_folder(spec: str, out: str | os.PathLike, parallel: Sequence[int] | None = None,
                  adapters: Sequence[str | os.PathLike] = (), graph: str = "auto", precision: str = "fp32",
                  overwrite: bool = False, threads: int | None = None, progress: bool = True) -> Path:
    """Export ``spec`` to the folder ``out`` (not the cache) as the ``graph`` kind in ``precision``
    fp32, fp16 or bf16: with ``adapters``, the trained ParScale parts of their P and the backbone
    itself (:func:`load_several`); with several ``parallel``, one backbone and the parts of every P
    (the first the default); else the model, converted to ``parallel[0]`` streams when given.

    Raises PrepareError when both ``adapters`` and ``parallel`` are given (the adapters set P), and
    what :func:`load_for_export` / :func:`load_several` / :func:`parscale_edge.export.export_model` raise."""
    if adapters and parallel:
        raise PrepareError("adapters set P; give adapters or P values, not both")
    if adapters or (parallel and len(parallel) > 1):
        lm, extra = load_several(spec, list(parallel) if parallel else None, threads, progress, adapters)
    else:
        lm, extra = load_for_export(spec, parallel[0] if parallel else None, threads, progress), []
    from parscale_edge.export import export_model

    return export_model(lm, out, overwrite=overwrite, graph=graph, extra_parallel=extra, precision=precision)


def ensure_export(spec: str, parallel: int | Sequence[int] | None = None, threads: int | None = None,
                  progress: bool = True, precision: str = "fp32", adapters: Sequence[str | os.PathLike] = ()) -> Path:
    """An export folder for ``spec``: itself when it is one (it must offer every P asked for), else
    a cached export (made once, :func:`export_cache_folder`) in ``precision`` fp32, fp16 or bf16.
    Several P: one fused backbone with a ParScale part file per P > 1; ``adapters``: trained parts
    for some of those P, the others are conversions. Progress goes to stderr.

    Raises ParallelError for a P out of range or not offered by the export folder ``spec``, and what
    :func:`load_for_export` / :func:`load_several` / :func:`parscale_edge.export.export_model` raise."""
    parallel = normalize_parallel(parallel, adapters)
    wanted = parallel if isinstance(parallel, list) else [parallel]
    if is_export_folder(spec):
        man = Manifest.read(spec)
        offered = man.parallel_choices()
        missing = [P for P in wanted if P and P not in offered]
        if missing:
            raise ParallelError("{spec} offers P in {offered}, not {missing}; re-export with {name} {wanted}",
                                spec=spec, offered=offered, missing=", ".join(map(str, missing)),
                                wanted=",".join(map(str, wanted)))
        say_load_warnings(man)
        return Path(spec)
    out = export_cache_folder(spec, parallel, precision, adapters)
    if (out / MANIFEST_FILE).exists():
        from .manifest import FORMAT_VERSION

        cached = Manifest.read(out)
        if cached.format_version == FORMAT_VERSION:
            say_load_warnings(cached)
            return out
        _log(f"cached export {out} was made by another parscale-edge version; exporting again")
    if isinstance(parallel, list) or adapters:  # (P=1 alone with adapters: a prefix-only control adapter is that P=1)
        lm, extra = load_several(spec, [p or 1 for p in wanted], threads, progress, adapters)
    else:
        lm, extra = load_for_export(spec, parallel, threads, progress), []
    from parscale_edge.export import export_model

    Ps = ", ".join(str(m.model.config.parscale_n) for m in [lm, *extra])
    _log(f"exporting {spec} (P={Ps}, {precision}) to {out} ...")
    t0 = time.perf_counter()
    export_model(lm, out, overwrite=True, extra_parallel=extra, precision=precision)
    _log(f"exported in {time.perf_counter() - t0:.1f} s")
    return out
