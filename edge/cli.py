"""``parscale`` command line: export, convert, train, generate, chat, demo.

Every command that runs a model goes through ONNX Runtime; torch is imported only to load,
convert or export a checkpoint (the ``export`` extra). A model argument is an export folder, a
named model (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``), a ``.gguf`` file or a
Hugging Face folder; anything but an export folder is exported once into the cache and reused.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .manifest import MANIFEST_FILE, Manifest

DEFAULT_MODEL = "smollm2-135m"


class CLIError(Exception):
    """A user-facing error: printed as ``error: ...`` with exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import UnsupportedModelError
    from .manifest import ManifestError
    from .runtime import RuntimeInputError

    errs: list[type[BaseException]] = [CLIError, UnsupportedModelError, ManifestError, RuntimeInputError,
                                       FileExistsError, FileNotFoundError, ValueError, UnicodeDecodeError]
    return tuple(errs)


def _import_export_stack():
    try:
        import torch  # noqa: F401
        import onnx  # noqa: F401
    except ImportError as e:
        raise CLIError(f"this step loads a checkpoint and exports it, which needs PyTorch and onnx ({e.name} is "
                       "missing): pip install 'parscale-edge[export]', or pass a folder made by `parscale export`"
                       ) from None


def _set_torch_threads(threads: int | None) -> None:
    import torch

    # On small shared CPUs PyTorch with several threads was 8-10x slower than with one (docs/parscale.md, "Threads").
    torch.set_num_threads(threads or 1)


def _is_export_folder(spec: str) -> bool:
    return (Path(spec) / MANIFEST_FILE).exists()


def _input_stamps(p: Path) -> list[str]:
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


def _cache_key(spec: str, parallel: int | Sequence[int] | None, precision: str = "fp32") -> str:
    """Cache folder name: ``<model>-p<P>-<precision>``; several P (one backbone): ``<model>-p1-2-4-fp32``."""
    from .hub import resolve_model

    kind, ref = resolve_model(spec)
    if kind == "named":
        base = ref
    else:
        p = Path(ref).resolve()
        digest = hashlib.sha256("|".join(_input_stamps(p)).encode()).hexdigest()[:12]
        base = f"{p.stem or p.name}-{digest}"
    if isinstance(parallel, Sequence):
        parallel = "-".join(str(P) for P in sorted(set(parallel)))
    return f"{base}-p{parallel}-{precision}" if parallel else f"{base}-{precision}"


def _check_P(P: int | None, flag: str = "--parallel") -> None:
    """Raises CLIError for P < 1 or above :data:`parscale_edge.config.MAX_PARALLEL` (before any slow work)."""
    from .config import MAX_PARALLEL

    if P is None:
        return
    if P < 1:
        raise CLIError(f"{flag} must be >= 1, got {P}")
    if P > MAX_PARALLEL:
        raise CLIError(f"{flag} {P} is above the supported {MAX_PARALLEL}: every stream adds its own prefix to "
                       f"every layer (a part file growing with P) and P multiplies the KV cache and the compute of "
                       f"every token; the paper uses P <= 8")


def load_for_export(spec: str, parallel: int | None, threads: int | None, progress: bool = True, seed: int = 0):
    """Load ``spec`` into PyTorch; convert a dense model to ``parallel`` streams when asked
    (trained adapters go through :func:`load_several`). Raises CLIError for a P out of range."""
    _check_P(parallel)
    _import_export_stack()
    _set_torch_threads(threads)
    from .loading import convert_to_parscale, load_model

    lm = load_model(spec, progress=progress)
    if lm.tokenizer is None:
        _log(f"warning: {spec} has no tokenizer.json: the export runs on token ids only, and generate, chat and "
             "eval will refuse it; copy tokenizer.json (and tokenizer_config.json) into the model folder first")
    P = lm.model.config.parscale_n
    if parallel and parallel != P:
        if P != 1:
            raise CLIError(f"{spec} already has P={P} streams; --parallel {parallel} needs a dense (P=1) model")
        lm = convert_to_parscale(lm, parallel, seed=seed)
    return lm


def load_several(spec: str, parallels: Sequence[int] | None, threads: int | None, progress: bool = True,
                 adapters: Sequence[str | os.PathLike] = ()):
    """(first model, the others): the dense ``spec`` as P = ``parallels[0]`` and, for the other P,
    the trained adapter of that P when ``adapters`` has one (``parscale train``), else its
    conversion; all over one backbone (``export_model(first, out, also=others)`` writes one folder
    that serves every P). ``parallels`` None: the adapters' P in their order, then P=1 (the backbone;
    a prefix-only adapter, the P=1 prefix-tuning control, takes the P=1 place instead).
    Raises CLIError when ``spec`` is not dense (P=1) or two adapters share a P, AdapterError for an
    adapter of another backbone (for a named model whose adapter names another named model, before
    anything is downloaded)."""
    from .loading import convert_to_parscale

    # bad adapter files, and a named model's adapter trained on another named model, are refused
    # from their headers before the (slow) load or download
    from .adapter import AdapterError, adapter_metadata

    for f in adapters:
        source = adapter_metadata(f)["source"]
        if spec in _named() and source in _named() and source != spec:
            raise AdapterError(f"{f}: this adapter was trained on {source}, not {spec}; export {source} "
                               "with it (nothing was downloaded)")
    dense = load_for_export(spec, None, threads, progress=progress)
    if dense.model.config.parscale_n != 1:
        raise CLIError(f"several P over one backbone need a dense (P=1) model; {spec} has "
                       f"P={dense.model.config.parscale_n}")
    trained = {}
    if adapters:
        from .adapter import apply_adapter, backbone_sha256

        digest = backbone_sha256(dense.model)  # once for every adapter
        for m in (apply_adapter(dense, f, backbone_hash=digest) for f in adapters):
            P = m.model.config.parscale_n
            if P in trained:
                raise CLIError(f"two adapters with P={P}; give one per P")
            trained[P] = m
    parallels = parallels or list(dict.fromkeys([*trained, 1]))
    models = [trained.get(P) or (dense if P == 1 else convert_to_parscale(dense, P)) for P in parallels]
    return models[0], models[1:]


def _normalize_parallel(parallel: int | Sequence[int] | None, adapters: Sequence = ()) -> tuple[int | None, list[int] | None]:
    """(single P or None, several P or None) for ``ensure_export``: a one-element list is a single P;
    with adapters the backbone's P=1 is always offered. Raises CLIError for P < 1."""
    if adapters:
        parallel = [parallel] if isinstance(parallel, int) else list(parallel or []) or [1]
        if parallel != [1]:
            parallel = [1, *parallel]  # the adapter's P over the backbone: keep the P=1 option with it
    several = sorted(set(parallel)) if isinstance(parallel, Sequence) else None
    if several is not None and len(several) == 1:
        parallel, several = several[0], None
    for P in several or [parallel]:
        _check_P(P)
    return parallel, several


def export_cache_folder(spec: str, parallel: int | Sequence[int] | None = None, precision: str = "fp32",
                        adapters: Sequence[str | os.PathLike] = ()) -> Path:
    """Where :func:`ensure_export` caches ``spec`` (not an export folder) for these P, precision and
    adapters: ``<cache>/onnx/<model>-p1-2-4[-a<adapters' hash>]-<precision>``."""
    from .hub import default_cache_dir

    parallel, several = _normalize_parallel(parallel, adapters)
    key = _cache_key(spec, several or parallel or (1 if spec in _named() else None), precision)
    if adapters:
        from .hub import sha256_file

        tag = hashlib.sha256("".join(sha256_file(a) for a in adapters).encode()).hexdigest()[:10]
        key = key.removesuffix(f"-{precision}") + f"-a{tag}-{precision}"
    return Path(default_cache_dir()) / "onnx" / key


def ensure_export(spec: str, parallel: int | Sequence[int] | None = None, threads: int | None = None,
                  progress: bool = True, precision: str = "fp32", adapters: Sequence[str | os.PathLike] = ()) -> Path:
    """An export folder for ``spec``: itself when it is one (it must offer every P asked for), else
    a cached export (made once, :func:`export_cache_folder`) in ``precision`` fp32, fp16 or bf16.
    Several P: one fused backbone with a ParScale part file per P > 1; ``adapters``: trained parts
    for some of those P, the others are conversions."""
    parallel, several = _normalize_parallel(parallel, adapters)
    if _is_export_folder(spec):
        man = Manifest.read(spec)
        offered = man.offered_parallel()
        missing = [P for P in several or [parallel] if P and P not in offered]
        if missing:
            raise CLIError(f"{spec} offers P in {offered}, not {', '.join(map(str, missing))}; re-export with "
                           f"--parallel {','.join(map(str, several or [parallel]))}")
        _say_load_warnings(man)
        return Path(spec)
    out = export_cache_folder(spec, parallel if several is None else several, precision, adapters)
    if (out / MANIFEST_FILE).exists():
        from .manifest import FORMAT_VERSION

        cached = Manifest.read(out)
        if cached.format_version == FORMAT_VERSION:
            _say_load_warnings(cached)
            return out
        _log(f"cached export {out} was made by another parscale-edge version; exporting again")
    if several or adapters:  # (P=1 alone with adapters: a prefix-only control adapter is that P=1)
        lm, also = load_several(spec, several or [parallel or 1], threads, progress, adapters)
    else:
        lm, also = load_for_export(spec, parallel, threads, progress), []
    from parscale_edge.export import export_model

    Ps = ", ".join(str(m.model.config.parscale_n) for m in [lm, *also])
    _log(f"exporting {spec} (P={Ps}, {precision}) to {out} ...")
    t0 = time.perf_counter()
    export_model(lm, out, overwrite=True, also=also, precision=precision)
    _log(f"exported in {time.perf_counter() - t0:.1f} s")
    return out


def _say_load_warnings(man: Manifest) -> None:
    """The warnings the source gave when it was exported (e.g. an unknown GGUF pre-tokenizer), again on
    every use of the export: they still apply, and the first run may have been long ago."""
    for msg in man.extra.get("load_warnings") or []:
        _log(f"warning: {msg}")


def _fused_parallel(spec: str, parallel: int | None) -> int | None:
    """The P to run an export folder given on the command line at (None: the folder's default)."""
    return parallel if parallel and _is_export_folder(spec) else None


def _named() -> set[str]:
    from .hub import MODELS

    return set(MODELS)


def _check_output(out: str, overwrite: bool, sources: Sequence[str] = ()) -> None:
    """Fail before any slow work when ``out`` cannot be written, or ``--overwrite`` may not replace it
    (:func:`parscale_edge.atomic.check_replaceable`: only this toolkit's folders, never one that is or holds a
    source)."""
    from .atomic import check_replaceable

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{p} exists and is not a folder; choose another output path")
    if p.exists() and not overwrite:
        raise CLIError(f"{p} exists; pass --overwrite or choose another folder")
    if overwrite:
        check_replaceable(p, [s for s in sources if s and Path(s).exists()])
    _check_parent(p)


def _check_parent(p: Path) -> None:
    """Raises CLIError when the folder ``p`` cannot be created: its nearest existing parent is a file
    or not writable."""
    parent = p.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"cannot create {p}: {parent} is a file, not a folder; choose another output path")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"cannot create {p}: {parent} is not writable")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------- commands
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
#: ``export --precision``: the float exports, then parscale_edge.quant.onnx_quant.PRECISIONS (quantized after an fp32 export)
EXPORT_PRECISIONS = FLOAT_PRECISIONS + ("int4", "int8", "int8-dynamic")


def cmd_export(a) -> None:
    if a.precision not in EXPORT_PRECISIONS:
        raise CLIError(f"unknown precision {a.precision!r}; use one of {', '.join(EXPORT_PRECISIONS)}")
    _check_output(a.output, a.overwrite, [a.model, *(a.adapter or []), a.calibration, a.text])  # before the slow work
    if a.precision not in FLOAT_PRECISIONS:
        _quant_config(a).validate()
    parallels = _ints(a.parallel, "parallel") if a.parallel else [None]
    for P in parallels:
        _check_P(P)
    adapters = a.adapter or []
    also = []
    if adapters:  # trained ParScale parts over the frozen backbone, plus the backbone itself (P=1)
        if a.parallel:
            raise CLIError("--adapter sets P; drop --parallel (several --adapter files give several P)")
        lm, also = load_several(a.model, None, a.threads, progress=not a.quiet, adapters=adapters)
    elif len(parallels) > 1:  # one backbone, ParScale parts for every P (dynamic parallel scaling)
        lm, also = load_several(a.model, parallels, a.threads, progress=not a.quiet)
    else:
        lm = load_for_export(a.model, parallels[0], a.threads, progress=not a.quiet)
    from parscale_edge.export import export_model

    if a.precision not in FLOAT_PRECISIONS:
        from .atomic import staging_folder

        with staging_folder(a.output) as staging:  # removed on exit, or by the next run if killed
            fp32 = export_model(lm, staging / "fp32", graph=a.graph, also=also)
            del lm
            _run_quantize(fp32, Path(a.output), a)
        return
    out = export_model(lm, a.output, overwrite=a.overwrite, graph=a.graph, also=also, precision=a.precision)
    man = Manifest.read(out)
    from .atomic import folder_size_mib

    size = folder_size_mib(out)
    print(f"exported {a.model} -> {out}  (P={man.parscale_n}, {man.num_layers} layers, {man.precision}, "
          f"{size:.1f} MiB)")
    if man.precision == "bf16":
        _log("note: a bf16 export runs on ONNX Runtime's CUDA provider (the CPU provider has no bfloat16 MatMul)")


def cmd_convert(a) -> None:
    if a.parallel < 2:
        raise CLIError(f"--parallel must be >= 2 for a ParScale model, got {a.parallel}")
    _check_P(a.parallel)
    _check_output(a.output, a.overwrite, [a.model])
    lm = load_for_export(a.model, None, a.threads, progress=not a.quiet)
    from .loading import convert_to_parscale, save_hf_folder

    conv = convert_to_parscale(lm, a.parallel, n_tokens=a.prefix_tokens, smooth=a.smooth, seed=a.seed)
    out = save_hf_folder(conv, a.output, overwrite=a.overwrite)
    print(f"converted {a.model} to P={a.parallel} -> {out}")
    if a.eval_positions:
        from .evaluate import perplexity, stdlib_text
        import torch

        if lm.tokenizer is None:
            print("no tokenizer in the source: perplexity not measured")
            return
        tokens = lm.tokenizer.encode(stdlib_text())
        rows = []
        for name, m in (("dense P=1", lm.model), (f"converted P={a.parallel}", conv.model)):
            def fn(ids, m=m):
                with torch.no_grad():
                    t = torch.from_numpy(ids)
                    return m(t, torch.ones_like(t), torch.arange(t.shape[1])[None].expand_as(t))[0].numpy()
            r = perplexity(fn, tokens, window=a.eval_window, max_positions=a.eval_positions)
            rows.append((name, r))
        print(f"perplexity on Python standard-library code ({rows[0][1]['positions']} positions, "
              f"window {a.eval_window}):")
        for name, r in rows:
            print(f"  {name:<16} {r['perplexity']:.3f}")
        print(f"  ratio            {rows[1][1]['perplexity'] / rows[0][1]['perplexity']:.4f}")


def cmd_train(a) -> None:
    _import_export_stack()
    _check_P(a.parallel)
    from .train import TrainConfig, check_run_folder, close_distributed, init_distributed

    cfg = TrainConfig(parallel=a.parallel, prefix=a.prefix, prefix_tokens=a.prefix_tokens, steps=a.steps or 1, seq_len=a.seq_len, batch=a.batch,
                      grad_accum=a.grad_accum, lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup_steps=a.warmup,
                      weight_decay=a.weight_decay, clip=a.clip, full=a.full, seed=a.seed, eval_every=a.eval_every,
                      eval_positions=a.eval_positions, eval_window=a.eval_window,
                      checkpoint_every=a.checkpoint_every)
    cfg.validate()
    if a.tokens is not None and a.tokens < 1:
        raise CLIError(f"--tokens must be >= 1, got {a.tokens}")
    out = Path(a.output)
    check_run_folder(out, a.resume, a.overwrite)  # fail before the slow load
    _check_parent(out)
    if a.overwrite and not a.resume:  # only a run folder of ours, never the model or the data
        from .atomic import check_replaceable
        from .train import ADAPTER_FILE, CHECKPOINT_FILE, CURVES_FILE, HISTORY_FILE

        check_replaceable(out, [s for s in [a.model, *a.data, *a.eval] if Path(s).exists()],
                          own_files={CHECKPOINT_FILE, ADAPTER_FILE, HISTORY_FILE, CURVES_FILE, "model"})
    train_files, eval_files, eval_text, eval_desc = _training_files(a.data, a.eval)
    new_folder = not out.exists()
    dist = init_distributed(a.device)
    try:
        _train_run(a, cfg, out, train_files, eval_text, eval_desc, dist)
    except BaseException:
        if new_folder and dist.main and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no empty folder
        raise
    finally:
        close_distributed(dist)


def _train_run(a, cfg, out, train_files, eval_text, eval_desc, dist) -> None:
    """The body of :func:`cmd_train` once the output and the data are checked."""
    from .train import train

    if dist.device.type == "cpu":
        _set_torch_threads(a.threads)
    from .corpus import read_texts, tokenize_texts
    from .loading import load_model

    lm = load_model(a.model, progress=not a.quiet and dist.main)
    if lm.tokenizer is None:
        raise CLIError(f"{a.model} has no tokenizer (tokenizer.json); training text cannot be tokenized")
    context = lm.model.config.max_position_embeddings
    if cfg.seq_len > context:
        raise CLIError(f"--seq-len {cfg.seq_len} is longer than {a.model}'s context of {context} tokens; "
                       f"use --seq-len {context} or less")
    t0 = time.perf_counter()
    train_tokens = tokenize_texts(lm.tokenizer, read_texts(train_files))
    from .corpus import BlockOrder

    BlockOrder(train_tokens, cfg.seq_len)  # the data check (one block at least) before anything is said or made
    eval_tokens = None
    if eval_text is not None:
        import numpy as np

        eval_tokens = np.asarray(lm.tokenizer.encode(eval_text), dtype=np.int64)
    steps = a.steps or -(-a.tokens // cfg.tokens_per_step(dist.world))
    cfg.steps = steps
    if dist.main:
        _log(f"data: {len(train_files)} files, {train_tokens.size} tokens (tokenized in "
             f"{time.perf_counter() - t0:.1f} s); eval: {eval_desc}"
             + (f", {eval_tokens.size} tokens" if eval_tokens is not None else ""))
        what = "prefixes (backbone frozen)" if cfg.prefix else "prefixes + aggregator (backbone frozen)"
        _log(f"training {'all weights' if cfg.full else what} of "
             f"{a.model} at P={cfg.parallel}{' (prefix only: the prefix-tuning control)' * cfg.prefix}: {steps} step{'s' if steps != 1 else ''} x {cfg.tokens_per_step(dist.world)} tokens = "
             f"{steps * cfg.tokens_per_step(dist.world)} tokens ({steps * cfg.tokens_per_step(dist.world) / max(1, train_tokens.size):.2f} "
             f"epochs), {dist.world} process(es) on {dist.device}")
    r = train(lm, cfg, train_tokens, out, eval_tokens=eval_tokens, resume=a.resume, overwrite=a.overwrite,
              dist=dist, progress=not a.quiet)
    if dist.main:
        h = r.history
        wall = sum(s["wall_seconds"] for s in h.get("sessions", []))
        print(f"trained {h['tokens_trained']} tokens in {wall:.0f} s wall ({h['train_seconds']:.0f} s in steps) -> "
              f"{r.adapter or r.model_dir}")
        if h.get("evals"):
            first, last = h["evals"][0], h["evals"][-1]
            line = f"held-out perplexity ({last['positions']} positions): "
            if "dense" in h:
                line += f"dense P=1 {h['dense']['perplexity']:.4f}, "
            print(line + f"untrained P={cfg.parallel} {first['perplexity']:.4f}, trained {last['perplexity']:.4f}")


def _training_files(data: list[str], evals: list[str]):
    """(train files, eval files, eval text or None, description); refuses eval files that are trained on."""
    from .corpus import FILE_SEPARATOR, collect_files, read_texts, stdlib_root
    from .evaluate import HELDOUT_MODULES, stdlib_text

    train_files = collect_files(data)
    if evals == ["none"]:
        return train_files, [], None, "none"
    if evals == ["stdlib"]:
        eval_files = [stdlib_root() / m for m in HELDOUT_MODULES]
        text, desc = stdlib_text(), "held-out Python standard-library modules (" + ", ".join(HELDOUT_MODULES) + ")"
    else:
        eval_files = collect_files(evals)
        text, desc = FILE_SEPARATOR.join(read_texts(eval_files)), f"{len(eval_files)} file(s)"
    overlap = {p.resolve() for p in train_files} & {p.resolve() for p in eval_files}
    if overlap:
        raise CLIError(f"{len(overlap)} evaluation file(s) are also training data, e.g. {sorted(overlap)[0]}; "
                       "held-out text must not be trained on")
    return train_files, eval_files, text, desc


def _quant_config(a):
    from parscale_edge.quant.onnx_quant import QuantConfig

    return QuantConfig(precision=a.precision, block_size=a.block_size, symmetric=a.symmetric,
                       accuracy_level=a.accuracy_level, algorithm=a.algorithm,
                       quantize_lm_head=not a.keep_lm_head, quantize_embedding=a.quantize_embedding,
                       gguf_blocks=not a.no_gguf_blocks)


def _import_quant_stack() -> None:
    try:
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401
    except ImportError as e:
        raise CLIError(f"quantization needs onnx and onnx-ir ({e.name} is missing): "
                       "pip install 'parscale-edge[quant]'") from None


def _run_quantize(src: Path, out: Path, a) -> None:
    _import_quant_stack()
    from parscale_edge.quant.onnx_quant import quantize_folder

    cfg = _quant_config(a)
    cfg.validate()
    calib = Path(a.calibration).read_text(encoding="utf-8") if a.calibration else None
    text = Path(a.text).read_text(encoding="utf-8") if a.text else None
    t0 = time.perf_counter()
    quantize_folder(src, out, cfg, overwrite=a.overwrite, calibration_text=calib, text=text,
                    check_positions=a.check_positions, compare_positions=a.compare_positions, threads=a.threads)
    q = Manifest.read(out).quantization
    base = Manifest.read(src).precision  # fp32 or fp16: what the sizes and the quality are compared with
    n = q.get("gguf_repacked_nodes") or 0
    rest = q["quantized_nodes"] - n
    # the settings apply to the weights that are re-rounded; GGUF blocks are copied as they are
    how = f"{'sym' if a.symmetric else 'asym'}, block {a.block_size}, {a.algorithm}"
    line = (f"{a.precision} ({how if rest > 0 else 'GGUF blocks'}) -> {out}: "
            f"{q['size_mib']:.1f} MiB ({base} {q['source_size_mib']:.1f} MiB, "
            f"{q['size_mib'] / q['source_size_mib']:.0%}) in {time.perf_counter() - t0:.1f} s")
    print(line)
    if n:
        print(f"  {n} {'weight reuses' if n == 1 else 'weights reuse'} the GGUF's own quantized blocks (no re-rounding); "
              + (f"{rest} re-rounded ({how})" if rest > 0 else "none re-rounded"))
    if "accuracy_check" in q:
        c = q["accuracy_check"]
        print(f"  accuracy_level 4 vs 0: top-1 agreement {c['agreement_level4_vs_level0']:.2%}, perplexity "
              f"{c['ppl_increase_level4_vs_level0']:+.2%} over {c['positions']} positions; chosen: {c['chosen']} "
              f"({c['agreement']:.2%}, {c['ppl_increase']:+.2%})")
        if c["chosen"] == "all level 0":
            _log("warning: every node now runs at accuracy_level 0; 8-bit MatMulNBits at level 0 decodes several "
                 "times slower than fp32 on CPUs (README, Quantization). For speed, quantize again with "
                 "--check-positions 0 (keeps level 4, top-1 agreement "
                 f"{c['agreement_level4_vs_level0']:.1%}) or use --precision int4")
    if "quality_vs_fp32" in q:
        r = q["quality_vs_fp32"]
        print(f"  quality cost vs {base} ({r['positions']} positions): perplexity {r['ref_perplexity']:.3f} -> "
              f"{r['cand_perplexity']:.3f} ({r['cand_perplexity'] / r['ref_perplexity'] - 1:+.2%}), "
              f"KL mean {r['kl_mean']:.4f} p99 {r['kl_p99']:.4f}, top-1 agreement {r['top1_agreement']:.2%}")


def cmd_quantize(a) -> None:
    _quant_config(a).validate()
    _check_output(a.output, a.overwrite, [a.model, a.calibration, a.text])
    if not _is_export_folder(a.model):
        raise CLIError(f"{a.model} is not an export folder (no {MANIFEST_FILE}); run `parscale export` first, "
                       "or use `parscale export MODEL --precision ...` to do both")
    _run_quantize(Path(a.model), Path(a.output), a)


def _write_json(path: str | None, obj: dict) -> None:
    if path:
        from .atomic import write_json

        write_json(path, obj)


def _eval_setup(a):
    from .evaluate import read_text

    text, desc = read_text(a.text)
    return text, desc


def _check_window(window: int | None, *rts) -> int:
    """``--window``, default 512 capped at the models' context; raises CLIError when a window given
    does not fit in it."""
    ctx = min(rt.manifest.max_position_embeddings for rt in rts)
    if window is None:
        return min(512, ctx)
    if window > ctx:
        raise CLIError(f"--window {window} is longer than the model's context of {ctx} tokens; use --window {ctx} "
                       "or less")
    return window


def cmd_eval(a) -> None:
    from .evaluate import onnx_logits_fn, perplexity
    from .runtime import OnnxCausalLM

    text, desc = _eval_setup(a)
    rt = OnnxCausalLM(ensure_export(a.model, a.parallel, a.threads, progress=not a.quiet), device=a.device,
                      parallel=_fused_parallel(a.model, a.parallel),
                      threads=a.threads)
    a.window = _check_window(a.window, rt)
    tokens = rt.tokenizer.encode(text)
    r = perplexity(onnx_logits_fn(rt), tokens, window=a.window, stride=a.stride, max_positions=a.max_positions)
    r.update(model=str(a.model), folder=str(rt.folder), precision=rt.manifest.precision, P=rt.P, text=desc,
             text_tokens=len(tokens))
    print(f"{a.model} (P={rt.P}, {rt.manifest.precision}): perplexity {r['perplexity']:.4f} over {r['positions']} "
          f"positions (window {r['window']}, stride {r['stride']}) of {desc}")
    _write_json(a.json, r)


def cmd_compare(a) -> None:
    from .evaluate import compare, onnx_logits_fn
    from .runtime import OnnxCausalLM

    text, desc = _eval_setup(a)
    ref = OnnxCausalLM(ensure_export(a.reference, a.reference_parallel, a.threads, progress=not a.quiet),
                       device=a.device, threads=a.threads, parallel=_fused_parallel(a.reference, a.reference_parallel))
    cand = OnnxCausalLM(ensure_export(a.candidate, a.candidate_parallel, a.threads, progress=not a.quiet),
                        device=a.device, threads=a.threads, parallel=_fused_parallel(a.candidate, a.candidate_parallel))
    a.window = _check_window(a.window, ref, cand)
    tokens = ref.tokenizer.encode(text)
    if cand.tokenizer.encode(text) != tokens:
        raise CLIError("the two models tokenize the text differently; compare models of the same tokenizer")
    r = compare(onnx_logits_fn(ref), onnx_logits_fn(cand), tokens, window=a.window, stride=a.stride,
                max_positions=a.max_positions)
    r.update(reference=str(a.reference), candidate=str(a.candidate), text=desc,
             reference_precision=ref.manifest.precision, candidate_precision=cand.manifest.precision,
             reference_parallel=ref.P, candidate_parallel=cand.P)
    print(f"{a.candidate} (P={cand.P}, {cand.manifest.precision}) vs {a.reference} (P={ref.P}, "
          f"{ref.manifest.precision}) over {r['positions']} positions of {desc}:")
    print(f"  KL(ref||cand) mean {r['kl_mean']:.5f}  p99 {r['kl_p99']:.5f}  max {r['kl_max']:.4f}")
    print(f"  top-1 agreement {r['top1_agreement']:.2%}")
    print(f"  perplexity ref {r['ref_perplexity']:.4f}  cand {r['cand_perplexity']:.4f} "
          f"({r['cand_perplexity'] / r['ref_perplexity'] - 1:+.2%})")
    _write_json(a.json, r)


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"--{name} takes comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise CLIError(f"--{name} needs positive integers, got {text!r}")
    return vals


def cmd_device_info(a) -> None:
    from .device import device_info

    info = device_info(refresh=a.refresh)
    c, bw = info["cpu"], info["bandwidth"]
    print(f"CPU        {c['model']} ({c['logical_cores']} logical cores; {' '.join(c['flags']) or 'no SIMD flags read'})")
    print(f"memory     {info['memory_gib']} GiB")
    print(f"bandwidth  {bw['read_gbps']} GB/s read, {bw['copy_gbps']} GB/s copy (one thread, {bw['array_mib']} MiB array)")
    print(f"runtime    onnxruntime {info['onnxruntime']}; providers {', '.join(info['providers'])}")
    from .providers import cuda_status

    works, why = cuda_status()
    print(f"CUDA       {'works (CUDAExecutionProvider probe session ran)' if works else 'not used: ' + why}")
    for g in info.get("gpu") or []:
        print(f"GPU        {g['name']} ({g['memory_mib']} MiB, driver {g['driver']}, compute {g['compute_capability']})")
    la = info["loadavg"]
    print(f"load avg   {' '.join(f'{x:.2f}' for x in la) if la else 'n/a'} (1/5/15 min)")
    print(f"           bandwidth measured {bw.get('measured_at', '?')} (cached; --refresh measures again)")
    _write_json(a.json, info)


def cmd_profile(a) -> None:
    import csv

    from tqdm import tqdm

    from .device import device_info
    from .profile import dense_twin_export, profile_folder, quantized_folder, versus_dense_summary

    if a.gen_len < 1 or a.repeat < 1 or a.warmup < 0:
        raise CLIError("--gen-len and --repeat must be >= 1 and --warmup >= 0")
    parallels, batches = _ints(a.parallel, "parallel"), _ints(a.batch, "batch")
    for P in parallels:
        _check_P(P)
    prompt_lens = _ints(a.prompt_len, "prompt-len")
    precisions = [p.strip() for p in a.precision.split(",")]
    bad = [p for p in precisions if p not in ("fp32", "fp16", "bf16", "int8", "int4")]
    if bad:
        raise CLIError(f"unknown precision {bad[0]!r} in --precision; use fp32, fp16, bf16, int8, int4")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    info = device_info()
    jobs = []  # (model, kind, P, folder, extra)
    for model in a.models:
        if _is_export_folder(model):
            man = Manifest.read(model)
            offered = man.offered_parallel()
            for P in [P for P in parallels if P in offered] or [man.parscale_n]:
                jobs.append((model, "parscale", P, Path(model), {"parallel": P}))
            continue
        for P in parallels:
            for prec in precisions:
                if prec in FLOAT_PRECISIONS:
                    folder = ensure_export(model, P, a.threads, progress=not a.quiet, precision=prec)
                else:
                    folder = quantized_folder(ensure_export(model, P, a.threads, progress=not a.quiet), prec, a.threads)
                jobs.append((model, "parscale", P, folder, {}))
        if a.versus_dense:
            from .scaling_law import PAPER

            law = PAPER[a.law]
            for P in parallels:
                if P == 1:
                    continue
                twins: dict[str, tuple] = {}  # one export per float precision; int4/int8 quantize the fp32 one
                for prec in precisions:
                    base_prec = prec if prec in FLOAT_PRECISIONS else "fp32"
                    if base_prec not in twins:
                        twins[base_prec] = dense_twin_export(model, P, law, a.threads, precision=base_prec)
                    twin, desc = twins[base_prec]
                    jobs.append((model, "dense", P, twin if prec in FLOAT_PRECISIONS else
                                 quantized_folder(twin, prec, a.threads),
                                 {"dense_layers": desc["layers"], "dense_params": desc["twin_non_embedding_params"],
                                  "target_params": desc["target_params"]}))
    rows = []
    for model, kind, P, folder, extra in tqdm(jobs, desc="profiling", disable=a.quiet):
        for r in profile_folder(folder, batches, prompt_lens, a.gen_len, a.threads, a.repeat, a.warmup,
                                device=a.device,
                                parallel=extra.pop("parallel", None)):
            rows.append({"model": model, "kind": kind, **r, "P": P, "folder": str(folder), **extra})
    on_gpu = any(r.get("vram_peak_mib") is not None for r in rows)
    summary = versus_dense_summary(rows, memory="vram" if on_gpu else "rss") if a.versus_dense else []
    settings = {k: getattr(a, k) for k in ("models", "parallel", "batch", "precision", "prompt_len", "gen_len",
                                           "threads", "repeat", "warmup", "versus_dense", "law", "device")}
    result = {"machine": info, "settings": settings, "rows": rows, "versus_dense": summary,
              "note": "dense twins have random weights: cost does not depend on weight values" if a.versus_dense else None}
    _write_json(str(out / "profile.json"), result)
    with open(out / "profile.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    print(f"machine: {info['cpu']['model']}, {info['cpu']['logical_cores']} cores, {info['memory_gib']} GiB, "
          f"read bandwidth {info['bandwidth']['read_gbps']} GB/s; threads {a.threads or 'ORT default'}")
    print("| model | kind | P | precision | batch | prompt | TTFT ms | prefill tok/s | decode ms p50/p90 | "
          "decode tok/s | peak RSS MiB | file MiB | load RSS / file | KV MiB | bw share |")
    print("| " + " | ".join(["---"] * 15) + " |")
    for r in rows:
        print(f"| {r['model']} | {r['kind']} | {r['P']} | {r['precision']} | {r['batch']} | {r['prompt_len']} | "
              f"{r['ttft_ms']:.0f} | {r['prefill_tokens_per_s']:.0f} | {r['decode_ms_p50']:.1f}/{r['decode_ms_p90']:.1f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['file_mib']:.0f} | "
              f"{r.get('load_rss_ratio') or float('nan'):.2f}x | "
              f"{r['kv_cache_mib']:.1f} | {r.get('bandwidth_share', 0):.0%} |")
    if summary:
        print("\nParScale against parameter scaling (increase over P=1; dense = scaling-law equivalent, random weights):")
        print("| precision | batch | P | memory +MiB ParScale / dense (ratio) | latency +ms ParScale / dense (ratio) |")
        print("| --- | --- | --- | --- | --- |")
        fmt = lambda r: "n/a" if r is None else f"{r:.1f}x"  # noqa: E731
        for s in summary:
            print(f"| {s['precision']} | {s['batch']} | {s['P']} | {s['parscale_memory_increase_mib']:.0f} / "
                  f"{s['dense_memory_increase_mib']:.0f} ({fmt(s['memory_ratio'])}) | "
                  f"{s['parscale_latency_increase_ms']:.0f} / {s['dense_latency_increase_ms']:.0f} "
                  f"({fmt(s['latency_ratio'])}) |")
    try:
        from .plots import plot_profile, plot_versus_dense

        title = f"{', '.join(a.models)} on {info['cpu']['model']} ({a.threads or 'default'} threads)"
        paths = plot_profile(rows, out, title)
        if summary:
            paths.append(plot_versus_dense(summary, out, title))
        print("plots: " + ", ".join(str(p) for p in paths))
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'parscale-edge[profile]')")
    print(f"results: {out / 'profile.json'}, {out / 'profile.csv'}")


def _parse_count(text: str) -> float:
    """``1.6e9``, ``1600000000``, ``1.6B``, ``500M`` -> parameters."""
    t = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        return float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        raise CLIError(f"cannot read a parameter count from {text!r}; write e.g. 1.6e9 or 1.6B") from None


def cmd_scaling_law(a) -> None:
    from . import scaling_law as sl

    if a.action == "fit":
        path = a.csv or str(Path(__file__).parent / "data" / "scaling-law-runs.csv")
        runs = sl.load_runs(path)
        names = [a.dataset] if a.dataset else sorted(runs)
        out = {}
        print(f"fit of L = (A / (N (k ln P + 1)))^alpha + E to {path} (Huber 1e-3 on log loss, L-BFGS-B, grid of starts)")
        print("| dataset | runs | E | A | k | alpha | R^2 | paper E | paper A | paper k | paper alpha |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in names:
            if name not in runs:
                raise CLIError(f"dataset {name!r} not in {path}; it has {', '.join(sorted(runs))}")
            N, P, L = runs[name]
            law = sl.fit(N, P, L, dataset=name)
            paper = sl.PAPER.get(name)
            ref = (f"{paper.E:.4f} | {paper.A:.4g} | {paper.k:.4f} | {paper.alpha:.4f}" if paper else "- | - | - | -")
            print(f"| {name} | {len(N)} | {law.E:.4f} | {law.A:.4g} | {law.k:.4f} | {law.alpha:.4f} | {law.r2:.4f} | {ref} |")
            out[name] = {"E": law.E, "A": law.A, "k": law.k, "alpha": law.alpha, "r2": law.r2, "runs": len(N)}
        _write_json(a.json, out)
        return
    if a.params is None or a.parallel is None:
        raise CLIError("predict needs --params N (non-embedding parameters) and --parallel P")
    law = sl.paper_law(a.law)
    N = _parse_count(a.params)
    rows = [{"P": P, "loss": law.loss(N, P), "gain": law.gain(P), "dense_equivalent_params": law.equivalent_dense_params(N, P)}
            for P in _ints(a.parallel, "parallel")]  # computed first: bad input fails before any output
    print(f"{a.law} law (paper constants): N = {N:.4g} non-embedding parameters")
    print("| P | predicted loss | gain k ln P + 1 | dense equivalent (non-embedding) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['P']} | {r['loss']:.4f} | {r['gain']:.3f}x | {r['dense_equivalent_params']:.4g} |")
    _write_json(a.json, {"law": a.law, "N": N, "rows": rows})


def _sampling(a):
    """SamplingConfig of the flags: greedy unless --do-sample, --temperature > 0, --top-k or --top-p
    asks for sampling; the temperature is then 1 unless given (``--temperature 0`` stays greedy)."""
    from .runtime import SamplingConfig

    t = a.temperature
    sample = bool(a.do_sample or a.top_k or a.top_p < 1.0 or (t is not None and t != 0))
    if t is None:
        t = 1.0 if sample else 0.0
    if a.seed is not None and (not sample or t == 0):
        _log("note: --seed has no effect on greedy decoding; add --do-sample (temperature 1) to sample")
    return SamplingConfig(max_new_tokens=a.max_new_tokens, do_sample=sample and t > 0,
                          temperature=t, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def _open_runtime(a):
    from .runtime import OnnxCausalLM

    folder = ensure_export(a.model, a.parallel, a.threads, progress=not a.quiet)
    return OnnxCausalLM(folder, device=a.device, threads=a.threads, parallel=_fused_parallel(a.model, a.parallel))


def _read_stdin() -> str:
    """The prompt from stdin, decoded as UTF-8 (CLIError naming the first bad byte otherwise)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"the prompt on stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       "convert it first, e.g. `iconv -f latin1 -t utf-8`") from None


def cmd_generate(a) -> None:
    sampling = _sampling(a)  # validate flags before any loading/export
    rt = _open_runtime(a)
    prompt = a.prompt if a.prompt is not None else _read_stdin()
    t0 = time.perf_counter()
    n = 0
    for piece in rt.stream_text(prompt, sampling, chat=a.chat):
        n += 1
        print(piece, end="", flush=True)
    print(flush=True)  # the text ends before the stats line on stderr
    if n == 0:  # said on stderr: an empty answer with exit 0 looks like a hang or a crash
        why = "the model ended at once (its first token was an end token) and wrote nothing"
        if not a.chat and rt.tokenizer.chat_template:
            why += ("; it has a chat template, so it is probably a chat (instruct) model: try --chat, which wraps "
                    "the prompt in its template")
        _log(f"warning: {why}")
    if a.verbose:
        _log(f"[{n} pieces in {time.perf_counter() - t0:.2f} s, P={rt.P}, {rt.folder}]")


def cmd_chat(a) -> None:
    from .runtime import RuntimeInputError

    sampling = _sampling(a)
    rt = _open_runtime(a)
    history: list[dict] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    _log(f"chatting with {a.model} (P={rt.P}, {rt.session.get_providers()[0]}); /reset clears history, "
         "/exit or Ctrl-D quits")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        msg = line.strip()
        if not msg:
            continue
        if msg in ("/exit", "/quit"):
            return
        if msg == "/reset":
            history = history[:1] if a.system else []
            continue
        answer = []
        try:
            for piece in rt.stream_text(msg, sampling, chat=True, history=history):
                answer.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            pass
        except (RuntimeInputError, ValueError) as e:  # this message cannot be run: say why, keep chatting
            print(flush=True)
            _log(f"error: {e} (the message was not added to the history; /reset clears it)")
            continue
        print()
        history += [{"role": "user", "content": msg}, {"role": "assistant", "content": "".join(answer)}]


def _check_port(host: str, port: int) -> None:
    """Raises CLIError when ``host:port`` cannot be served (busy, or an address of another machine)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise CLIError(f"--host {host}: cannot resolve it ({e.strerror or e}); use 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if os.name != "nt":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            raise CLIError(f"cannot serve on {host}:{port} ({e.strerror or e}): the port is in use or not allowed; "
                           "choose another --port, or leave it out for a free one") from None


def cmd_demo(a) -> None:
    from parscale_edge.demo.models import PRECISIONS

    if a.precision not in PRECISIONS:
        raise CLIError(f"unknown precision {a.precision!r}; use {', '.join(PRECISIONS)}")
    for name in ("left_parallel", "right_parallel"):
        if getattr(a, name) is not None:
            setattr(a, name, _ints(getattr(a, name), name.replace("_", "-")))
    if a.concurrency < 1 or a.max_new_tokens < 1:
        raise CLIError(f"--concurrency and --max-new-tokens must be >= 1, got {a.concurrency} and {a.max_new_tokens}")
    if a.port is not None and not 0 < a.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {a.port}")
    if a.port is not None:
        _check_port(a.host, a.port)  # before loading the models (minutes)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CLIError("the demo needs gradio: pip install 'parscale-edge[demo]'") from None
    from parscale_edge.demo.app import build_app, launch
    from parscale_edge.demo.models import load_pair

    left, right = load_pair(a.left, a.left_parallel, a.right, a.right_parallel, a.precision, a.threads,
                            a.device, progress=not a.quiet, log=_log)
    if not left.ok and not right.ok:
        raise CLIError(f"neither model loaded: left: {left.error}; right: {right.error}")
    app = build_app(left, right, concurrency=a.concurrency, max_new_tokens=a.max_new_tokens, threads=a.threads)
    launch(app, a.host, a.port, share=a.share)


# ---------------------------------------------------------------------------------------- parser
def _count_arg(text: str) -> int:
    """An integer count, also written as ``1e9`` (argparse type)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: write an integer such as 128") from None
    if not v.is_integer():
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: write an integer such as 128")
    return int(v)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"export folder, named model, .gguf or HF folder (default {DEFAULT_MODEL})")
    p.add_argument("--parallel", "-P", type=int, default=None,
                   help="P streams: converts a dense model to P streams before exporting (cached)")
    p.add_argument("--max-new-tokens", "-n", type=_count_arg, default=128,
                   help="new tokens at most (default 128; capped by the context; 1e3 is accepted)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (> 0 samples; 0 = greedy). Default: greedy, or 1 when --do-sample, "
                        "--top-k or --top-p asks for sampling")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set with this probability")
    p.add_argument("--do-sample", action="store_true", help="sample (temperature 1 unless given)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (sampling only)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--block-size", type=int, default=32, help="4/8-bit block size, power of two 16..256")
    g.add_argument("--symmetric", action="store_true", help="symmetric blocks (default asymmetric)")
    g.add_argument("--accuracy-level", type=int, default=4, choices=range(5),
                   help="MatMulNBits compute: 0 unset/fp32 ... 4 int8 activations (default; checked, see README)")
    g.add_argument("--algorithm", choices=["rtn", "hqq", "gptq"], default="rtn")
    g.add_argument("--calibration", default=None, help="text file for GPTQ calibration")
    g.add_argument("--keep-lm-head", action="store_true", help="leave the output head in float")
    g.add_argument("--quantize-embedding", action="store_true", help="int4 embedding (GatherBlockQuantized)")
    g.add_argument("--no-gguf-blocks", action="store_true",
                   help="re-round everything instead of reusing a GGUF source's quantized blocks")
    g.add_argument("--text", default=None, help="text for the quality check (default: held-out stdlib code)")
    g.add_argument("--check-positions", type=int, default=2048, help="accuracy_level check positions (0: skip)")
    g.add_argument("--compare-positions", type=int, default=1024, help="quality-vs-fp32 positions (0: skip)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="parscale", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (ONNX Runtime intra-op; PyTorch: 1)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True)
    # the global options are accepted after the subcommand too (`parscale generate --threads 2`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS)
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS)
    add_parser = sub.add_parser
    sub.add_parser = lambda *args, **kw: add_parser(*args, parents=[common], **kw)  # type: ignore[method-assign]

    p = sub.add_parser("export", help="export a model to ONNX (P folded into the batch axis, KV cache in/out)")
    p.add_argument("model", help="named model, .gguf file or Hugging Face folder")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    p.add_argument("--parallel", "-P", default=None,
                   help="convert a dense model to P streams first; a list (1,2,4) puts one backbone and the "
                        "ParScale parts of every P in one folder (the first is the default)")
    p.add_argument("--adapter", action="append", default=None,
                   help="adapter file from `parscale train` (trained prefixes + aggregator; sets P), refused "
                        "unless MODEL is the backbone it was trained on; repeat it for several P over one "
                        "backbone (the folder also offers P=1, the backbone alone)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--graph", choices=["auto", "fused", "reference"], default="auto",
                   help="fused (ONNX Runtime fused ops, preallocated KV cache), reference (TorchScript trace "
                        "of the PyTorch model, for checking) or auto (default: fused where it can run)")
    p.set_defaults(func=cmd_export)

    p.add_argument("--precision", default="fp32",
                   help="fp32 (default), fp16 or bf16 (the CUDA path: the fused graph's GroupQueryAttention is half "
                        "precision only there; float32 kept for norms, residual, aggregator, logits; bf16 runs on "
                        "CUDA only), int4, int8 or int8-dynamic")
    _add_quant_args(p)

    p = sub.add_parser("quantize", help="quantize an fp32 export folder (int4 / int8, weight-only)")
    p.add_argument("model", help="an fp32 export folder")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--precision", default="int4", help="int4 (default), int8 or int8-dynamic")
    p.add_argument("--overwrite", action="store_true")
    _add_quant_args(p)
    p.set_defaults(func=cmd_quantize)

    for name, fn, hlp in (("eval", cmd_eval, "perplexity of a model on a text (sliding window)"),
                          ("compare", cmd_compare, "KL divergence / top-1 agreement of a candidate vs a reference")):
        p = sub.add_parser(name, help=hlp)
        if name == "eval":
            p.add_argument("model")
            p.add_argument("--parallel", "-P", type=int, default=None)
        else:
            p.add_argument("reference")
            p.add_argument("candidate")
            p.add_argument("--reference-parallel", type=int, default=None, metavar="P",
                           help="P to run the reference at (a folder offering several; default its own)")
            p.add_argument("--candidate-parallel", type=int, default=None, metavar="P",
                           help="P to run the candidate at")
        p.add_argument("--text", default=None, help="UTF-8 text file (default: held-out Python stdlib code)")
        p.add_argument("--window", type=int, default=None, help="tokens per window (default 512, at most the context)")
        p.add_argument("--stride", type=int, default=None, help="default window/2")
        p.add_argument("--max-positions", type=int, default=4096)
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        p.add_argument("--json", default=None, help="also write the result as JSON here")
        p.set_defaults(func=fn)

    p = sub.add_parser("scaling-law", help="fit the parallel scaling law, or predict with it (paper Eq. 5)")
    p.add_argument("action", choices=["fit", "predict"])
    p.add_argument("csv", nargs="?", default=None, help="fit: runs CSV (dataset,P,non_embedding_params,loss); "
                   "default: the paper's 48 runs")
    p.add_argument("--dataset", default=None, help="fit only this dataset")
    p.add_argument("--params", "-N", default=None, help="predict: non-embedding parameters (1.6e9 or 1.6B)")
    p.add_argument("--parallel", "-P", default="1,2,4,8", help="predict: comma-separated P")
    p.add_argument("--law", default="stack-v2-python", choices=["stack-v2-python", "pile"])
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_scaling_law)

    p = sub.add_parser("device-info", help="CPU/GPU description and measured memory bandwidth (cached)")
    p.add_argument("--refresh", action="store_true", help="measure the bandwidth again")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_device_info)

    p = sub.add_parser("profile", help="latency and memory on this device: P against parameter scaling")
    p.add_argument("models", nargs="*", default=[DEFAULT_MODEL], help=f"models or export folders (default {DEFAULT_MODEL})")
    p.add_argument("--parallel", "-P", default="1,2,4,8", help="comma-separated P values")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,fp16,bf16,int8,int4")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the models run (auto: CUDA when it works, else CPU); GPU runs report GPU memory")
    p.add_argument("--prompt-len", default="64", help="comma-separated prompt lengths")
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--versus-dense", action="store_true",
                   help="also profile, per P, a dense model of the scaling law's equivalent size")
    p.add_argument("--law", default="stack-v2-python", choices=["stack-v2-python", "pile"],
                   help="scaling-law constants used for the dense equivalent (the paper's fits, `parscale scaling-law`)")
    p.add_argument("-o", "--output", required=True, help="results folder (JSON, CSV, PNG)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("convert", help="turn a dense model into a ParScale one (authors' HF format)")
    p.add_argument("model")
    p.add_argument("--parallel", "-P", type=int, required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--prefix-tokens", type=int, default=48, help="prefix length per layer and stream (48 in releases)")
    p.add_argument("--smooth", type=float, default=0.1, help="aggregation smoothing epsilon (0.1 in releases)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-positions", type=int, default=1024,
                   help="positions of held-out stdlib code to report perplexity on (0: skip)")
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="stage-2 training: ParScale prefixes + aggregator on a frozen backbone -> adapter")
    p.add_argument("model", help="dense model (named, .gguf, HF folder) or a ParScale one with the same P")
    p.add_argument("--parallel", "-P", type=int, required=True, help="P streams (>= 2; 1 with --prefix)")
    p.add_argument("--prefix", action="store_true",
                   help="with --parallel 1: the prefix-tuning control (one stream with its own KV prefix, no "
                        "aggregator; README 'Does ParScale help, or is it prefix tuning?')")
    p.add_argument("--data", nargs="+", required=True,
                   help="training text: files, folders (their .py files), globs, or 'stdlib' (the standard "
                        "library's training split, README)")
    p.add_argument("--eval", nargs="+", default=["stdlib"],
                   help="held-out text: 'stdlib' (default: held-out stdlib modules), files/globs, or 'none'")
    p.add_argument("-o", "--output", required=True, help="run folder: adapter, checkpoint, history, curves")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (default 1M; rounded up to whole steps)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --tokens)")
    p.add_argument("--prefix-tokens", type=int, default=48, help="prefix slots per layer and stream of a conversion")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per training sequence; train at the context length you will use (README)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch and process")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping, global L2 norm (0: off)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--freeze-backbone", dest="full", action="store_false", help="train prefixes + aggregator only (default)")
    g.add_argument("--full", dest="full", action="store_true", help="train every weight (writes model/, no adapter)")
    p.set_defaults(full=False)
    p.add_argument("--seed", type=int, default=0, help="ParScale init noise and data order")
    p.add_argument("--eval-every", type=int, default=25, help="held-out perplexity every N steps")
    p.add_argument("--eval-positions", type=int, default=1024)
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--checkpoint-every", type=int, default=25, help="checkpoint (atomic) every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in a non-empty --output")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate from a prompt (streams to stdout)")
    _add_run_args(p)
    p.add_argument("--prompt", "-p", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template (instruct models; without it the prompt is "
                        "continued as raw text, and an answer that ends at once is reported on stderr)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_run_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)

    from parscale_edge.demo.models import DEFAULTS

    p = sub.add_parser("demo", help="web demo: a ParScale model and a larger dense model answer side by side (gradio)")
    p.add_argument("--left", default=DEFAULTS.left, help=f"the ParScale side (default {DEFAULTS.left})")
    p.add_argument("--left-parallel", default=None, metavar="P[,P...]",
                   help="P the left model offers, one backbone for all (the first is selected at start; default "
                        f"{','.join(map(str, DEFAULTS.left_parallel))}; an export folder: every P it offers)")
    p.add_argument("--right", default=DEFAULTS.right, help=f"the dense side (default {DEFAULTS.right})")
    p.add_argument("--right-parallel", default=None, metavar="P[,P...]",
                   help=f"P of the right model (default {','.join(map(str, DEFAULTS.right_parallel))})")
    p.add_argument("--precision", default=DEFAULTS.precision,
                   help=f"fp32, int8 or int4 for models the demo exports (default {DEFAULTS.precision}; "
                        "export folders run as they are)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--concurrency", type=int, default=2, help="answers decoded at once; more requests queue (default 2)")
    p.add_argument("--max-new-tokens", "-n", type=_count_arg, default=256, help="initial max new tokens (default 256)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=cmd_demo)
    return ap


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _show_warning
    a = build_parser().parse_args(argv)
    try:
        if getattr(a, "threads", None) is not None and a.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {a.threads} (leave it out for ONNX Runtime's default)")
        _check_paths(a)
        a.func(a)
    except _user_errors() as e:
        print(f"error: {_environment_error(e) or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - only the environment's failures become one line; the rest re-raise
        msg = _environment_error(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


def _check_paths(a) -> None:
    """Before any work: every output file (``--json``) can be written, every input file a flag names
    (``--text``, ``--calibration``) exists, naming the flag (OutputPathError / CLIError)."""
    from .atomic import check_output_file

    if getattr(a, "json", None):
        check_output_file(a.json, "--json")
    if a.command == "profile":
        check_output_file(Path(a.output) / "profile.json", "-o")
    for flag in ("text", "calibration"):
        f = getattr(a, flag, None)
        if f is not None and not Path(f).is_file():
            what = "is a folder, not a text file" if Path(f).is_dir() else "does not exist"
            raise CLIError(f"--{flag} {f} {what}; give a UTF-8 text file")


def _environment_error(e: BaseException) -> str | None:
    """One line for a failure of the machine rather than of the input: no space left, no permission,
    a read-only disk, no network to the package index; None for anything else (a bug: traceback)."""
    import errno

    from .atomic import public_path
    from .hub import DownloadError

    if isinstance(e, DownloadError):
        return str(e).splitlines()[0]
    cause = e.__cause__ if isinstance(e.__cause__, OSError) else e  # e.g. ExportError from an OSError
    text = str(e)
    code = getattr(cause, "errno", None)
    where = getattr(cause, "filename", None)
    where = f" ({public_path(where)})" if where else ""
    if code == errno.ENOSPC or "No space left on device" in text or "StorageFull" in text:
        return (f"no space left on the device{where}; nothing was kept. Free space there, or write to another "
                "disk (-o, or PARSCALE_EDGE_CACHE for the cache)")
    if code in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
        return f"{cause.strerror or text}{where}; choose another path"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{cause.strerror or text}{where}; choose a folder you can write (-o, or PARSCALE_EDGE_CACHE for the "
                "cache)")
    return None


if __name__ == "__main__":
    sys.exit(main())
