"""``parscale`` command line: export, convert, train, generate, chat, demo.

Every command that runs a model goes through ONNX Runtime; torch is imported only to load,
convert or export a checkpoint (the ``export`` extra). A model argument is an export folder, a
named model (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``), a ``.gguf`` file or a
Hugging Face folder; anything but an export folder is exported once into the cache and reused
(:mod:`parscale_edge.prepare`).

This module is the command-line layer only: :func:`build_parser` (at the bottom) declares the
flags, :func:`main` parses them and calls the ``cmd_*`` function of the command with the flag
values as keyword arguments; the work is done by the library modules. Imports of those modules
(and of torch, onnx, onnxruntime, gradio) sit inside the functions that need them, so that
``parscale --help`` and the torch-free commands start fast.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import check_output_folder
from .manifest import MANIFEST_FILE, Manifest
from .prepare import (FLOAT_PRECISIONS, ParallelError, check_parallel, ensure_export, export_folder, fused_parallel,
                      import_export_stack, import_quant_stack, is_export_folder, load_for_export, parse_parallel)

DEFAULT_MODEL = "smollm2-135m"
#: ``export --precision``: the float exports, then parscale_edge.quant.onnx_quant.PRECISIONS (quantized after an fp32 export)
EXPORT_PRECISIONS = FLOAT_PRECISIONS + ("int4", "int8", "int8-dynamic")
#: ``profile --precision``
PROFILE_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")


class CLIError(Exception):
    """A user-facing error: printed as ``error: ...`` with exit status 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import UnsupportedModelError
    from .manifest import ManifestError
    from .runtime import RuntimeInputError

    return (CLIError, UnsupportedModelError, ManifestError, RuntimeInputError, FileExistsError, FileNotFoundError,
            ValueError, UnicodeDecodeError)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ints(text: str, flag: str = "--parallel", check_range: bool = False) -> list[int]:
    """A comma-separated list of positive integers (``1,2,4``: ``--batch``, ``--prompt-len``, P), with
    ``check_range`` also checked against P's supported range; CLIError naming ``flag`` otherwise."""
    try:
        values = parse_parallel(text)
        if check_range:
            check_parallel(values)
    except ParallelError as e:
        raise CLIError(e.naming(flag)) from None
    return values


def _write_json(path: str | None, obj: dict) -> None:
    if path:
        from .atomic import write_json

        write_json(path, obj)


def _print_table(table, fmt: str) -> None:
    from .report import format_table

    print(format_table(table, fmt), end="")


# ------------------------------------------------------------------------------ export, quantize
@dataclass(frozen=True)
class QuantFlags:
    """The quantization group's flags (``export --precision int4``, ``quantize``)."""

    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    algorithm: str = "rtn"
    calibration: str | None = None
    keep_lm_head: bool = False
    quantize_embedding: bool = False
    no_gguf_blocks: bool = False
    text: str | None = None
    check_positions: int = 2048
    compare_positions: int = 1024
    kv_cache: str | None = None  # --kv-cache: float (None, the graph's own type) or int8

    def config(self, precision: str):
        """The :class:`parscale_edge.quant.onnx_quant.QuantConfig` of these flags (needs onnx)."""
        from parscale_edge.quant.onnx_quant import QuantConfig

        return QuantConfig(precision=precision, block_size=self.block_size, symmetric=self.symmetric,
                           accuracy_level=self.accuracy_level, algorithm=self.algorithm,
                           quantize_lm_head=not self.keep_lm_head, quantize_embedding=self.quantize_embedding,
                           gguf_blocks=not self.no_gguf_blocks)


def cmd_export(model: str, output: str, parallel: str | None, adapter: list[str] | None, overwrite: bool, graph: str,
               precision: str, quant: QuantFlags, threads: int | None, quiet: bool) -> None:
    if precision not in EXPORT_PRECISIONS:
        raise CLIError(f"unknown precision {precision!r}; use one of {', '.join(EXPORT_PRECISIONS)}")
    # before the slow work
    check_output_folder(output, overwrite, [model, *(adapter or []), quant.calibration, quant.text])
    if precision not in FLOAT_PRECISIONS:
        quant.config(precision).validate()
    kv = _kv_choice(quant)
    Ps = _ints(parallel, check_range=True) if parallel else None
    if adapter and parallel:
        raise CLIError("--adapter sets P; drop --parallel (several --adapter files give several P)")
    if precision not in FLOAT_PRECISIONS or kv == "int8":
        from .atomic import staging_folder

        with staging_folder(output) as staging:  # removed on exit, or by the next run if killed
            quantized = precision not in FLOAT_PRECISIONS
            fp32 = export_folder(model, staging / "fp32", Ps, adapter or (), graph=graph, threads=threads,
                                 precision="fp32" if quantized else precision, progress=not quiet)
            _run_quantize(fp32, Path(output), precision if quantized else None, quant, overwrite, threads)
        return
    out = export_folder(model, output, Ps, adapter or (), graph=graph, precision=precision, overwrite=overwrite,
                        threads=threads, progress=not quiet)
    man = Manifest.read(out)
    from .atomic import folder_size_mib

    size = folder_size_mib(out)
    Ps = ",".join(map(str, man.parallel_choices()))
    print(f"exported {model} -> {out}  (P={Ps}, {man.num_layers} layers, {man.precision}, {size:.1f} MiB)")
    if man.precision == "bf16":
        _log("note: a bf16 export runs on ONNX Runtime's CUDA provider (the CPU provider has no bfloat16 MatMul)")


def _kv_choice(quant: QuantFlags) -> str:
    """``--kv-cache``: ``float`` when not given, else checked by
    :func:`parscale_edge.quant.kv_int8.check_kv_choice` (QuantizationError, one line, for another value)."""
    if quant.kv_cache is None:
        return "float"
    import_quant_stack()
    from parscale_edge.quant.kv_int8 import check_kv_choice

    return check_kv_choice(quant.kv_cache)


def _run_quantize(src: Path, out: Path, precision: str | None, quant: QuantFlags, overwrite: bool,
                  threads: int | None) -> None:
    """Quantize the weights to ``precision`` and/or (``--kv-cache int8``) the KV cache; ``precision``
    None: the KV cache only (:func:`parscale_edge.quant.kv_int8.quantize_kv_folder`)."""
    import_quant_stack()
    from parscale_edge.quant.onnx_quant import level0_warning, quantize_folder, report_lines

    calib = Path(quant.calibration).read_text(encoding="utf-8") if quant.calibration else None
    text = Path(quant.text).read_text(encoding="utf-8") if quant.text else None
    t0 = time.perf_counter()
    from parscale_edge.quant.kv_int8 import quantize_kv_folder, report_lines as kv_report_lines

    if precision is None:
        quantize_kv_folder(src, out, overwrite, calib, quant.compare_positions, text, threads)
        print("\n".join(kv_report_lines(Manifest.read(out), out, time.perf_counter() - t0)))
        return
    cfg = quant.config(precision)
    cfg.validate()
    quantize_folder(src, out, cfg, overwrite=overwrite, calibration_text=calib, text=text,
                    check_positions=quant.check_positions, compare_positions=quant.compare_positions, threads=threads,
                    kv_cache=_kv_choice(quant))
    seconds, man = time.perf_counter() - t0, Manifest.read(out)
    q = man.quantization
    print("\n".join(report_lines(q, cfg, out, Manifest.read(src).precision, seconds)))  # sizes vs the fp32/fp16 source
    if man.kv_cache:  # --precision and --kv-cache int8 together
        print("\n".join(kv_report_lines(man, out, seconds)))
    warning = level0_warning(q)
    if warning:
        _log(f"warning: {warning}")


def cmd_quantize(model: str, output: str, precision: str | None, overwrite: bool, quant: QuantFlags,
                 threads: int | None) -> None:
    if precision is None and _kv_choice(quant) == "float":
        precision = "int4"  # the default; with --kv-cache int8 alone the weights stay as they are
    if precision is not None:
        quant.config(precision).validate()
    check_output_folder(output, overwrite, [model, quant.calibration, quant.text])
    if not is_export_folder(model):
        raise CLIError(f"{model} is not an export folder (no {MANIFEST_FILE}); run `parscale export` first, "
                       "or use `parscale export MODEL --precision ...` to do both")
    _run_quantize(Path(model), Path(output), precision, quant, overwrite, threads)


# ------------------------------------------------------------------------------- convert, train
def cmd_convert(model: str, parallel: int, output: str, prefix_tokens: int, smooth: float, seed: int,
                eval_positions: int, eval_window: int, overwrite: bool, threads: int | None, quiet: bool) -> None:
    if parallel < 2:
        raise CLIError(f"--parallel must be >= 2 for a ParScale model, got {parallel}")
    check_parallel(parallel)
    check_output_folder(output, overwrite, [model])
    lm = load_for_export(model, None, threads, progress=not quiet)
    from .loading import convert_to_parscale, save_hf_folder

    conv = convert_to_parscale(lm, parallel, n_tokens=prefix_tokens, smooth=smooth, seed=seed)
    out = save_hf_folder(conv, output, overwrite=overwrite)
    print(f"converted {model} to P={parallel} -> {out}")
    if eval_positions:
        if lm.tokenizer is None:
            print("no tokenizer in the source: perplexity not measured")
            return
        from .train import conversion_perplexity

        r = conversion_perplexity(lm, conv, eval_positions, eval_window)
        print(f"perplexity on Python standard-library code ({r['positions']} positions, window {r['window']}):")
        for name, value in (("dense P=1", r["dense"]), (f"converted P={parallel}", r["converted"])):
            print(f"  {name:<16} {value:.3f}")
        print(f"  ratio            {r['ratio']:.4f}")


def cmd_train(model: str, parallel: int, prefix: bool, data: list[str], eval: list[str], output: str,
              tokens: int | None, steps: int | None, prefix_tokens: int, seq_len: int, batch: int, grad_accum: int,
              lr: float, min_lr_ratio: float, warmup: int, weight_decay: float, clip: float, full: bool, seed: int,
              eval_every: int, eval_positions: int, eval_window: int, checkpoint_every: int, resume: bool,
              overwrite: bool, device: str, threads: int | None, quiet: bool) -> None:
    import_export_stack()
    check_parallel(parallel)
    from .train import TrainConfig, check_run_folder, run_training, summary_lines, training_files

    cfg = TrainConfig(parallel=parallel, prefix=prefix, prefix_tokens=prefix_tokens, steps=steps or 1, seq_len=seq_len,
                      batch=batch, grad_accum=grad_accum, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup,
                      weight_decay=weight_decay, clip=clip, full=full, seed=seed, eval_every=eval_every,
                      eval_positions=eval_positions, eval_window=eval_window, checkpoint_every=checkpoint_every)
    cfg.validate()
    if tokens is not None and tokens < 1:
        raise CLIError(f"--tokens must be >= 1, got {tokens}")
    out = Path(output)
    check_run_folder(out, resume, overwrite, sources=[model, *data, *eval])  # fail before the slow load
    train_files, _, eval_text, eval_desc = training_files(data, eval)
    r = run_training(model, cfg, out, train_files, eval_text, eval_desc, tokens=tokens, steps=steps, device=device,
                     resume=resume, overwrite=overwrite, threads=threads, progress=not quiet, log=_log)
    if r is not None:  # rank 0 reports
        print("\n".join(summary_lines(r, cfg.parallel)))


# --------------------------------------------------------------------------------- eval, compare
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


def _open(spec: str, parallel: int | None, device: str, threads: int | None, quiet: bool):
    """An :class:`parscale_edge.runtime.OnnxCausalLM` of ``spec`` at P ``parallel`` (prepared first)."""
    from .runtime import OnnxCausalLM

    folder = ensure_export(spec, parallel, threads, progress=not quiet)
    return OnnxCausalLM(folder, device=device, threads=threads, parallel=fused_parallel(spec, parallel))


def cmd_eval(model: str, parallel: int | None, text: str | None, window: int | None, stride: int | None,
             max_positions: int, device: str, json: str | None, format: str, threads: int | None,
             quiet: bool) -> None:
    from .evaluate import onnx_logits_fn, perplexity, read_text
    from .report import eval_summary, eval_table

    text, desc = read_text(text)
    rt = _open(model, parallel, device, threads, quiet)
    window = _check_window(window, rt)
    tokens = rt.tokenizer.encode(text)
    r = perplexity(onnx_logits_fn(rt), tokens, window=window, stride=stride, max_positions=max_positions)
    r.update(model=str(model), folder=str(rt.folder), precision=rt.manifest.precision, P=rt.P, text=desc,
             text_tokens=len(tokens))
    if format == "md":
        print(eval_summary(r))
    else:
        _print_table(eval_table([r]), format)
    _write_json(json, r)


def cmd_compare(reference: str, candidate: str, reference_parallel: int | None, candidate_parallel: int | None,
                text: str | None, window: int | None, stride: int | None, max_positions: int, device: str,
                json: str | None, format: str, threads: int | None, quiet: bool) -> None:
    from .evaluate import compare, onnx_logits_fn, read_text
    from .report import compare_summary, compare_table

    text, desc = read_text(text)
    ref = _open(reference, reference_parallel, device, threads, quiet)
    cand = _open(candidate, candidate_parallel, device, threads, quiet)
    window = _check_window(window, ref, cand)
    tokens = ref.tokenizer.encode(text)
    if cand.tokenizer.encode(text) != tokens:
        raise CLIError("the two models tokenize the text differently; compare models of the same tokenizer")
    r = compare(onnx_logits_fn(ref), onnx_logits_fn(cand), tokens, window=window, stride=stride,
                max_positions=max_positions)
    r.update(reference=str(reference), candidate=str(candidate), text=desc,
             reference_precision=ref.manifest.precision, candidate_precision=cand.manifest.precision,
             reference_parallel=ref.P, candidate_parallel=cand.P)
    if format == "md":
        print(compare_summary(r))
    else:
        _print_table(compare_table([r]), format)
    _write_json(json, r)


# ------------------------------------------------------------------ device-info, profile, scaling-law
def cmd_device_info(refresh: bool, json: str | None) -> None:
    from .device import device_info
    from .providers import cuda_status
    from .report import device_summary

    info = device_info(refresh=refresh)
    print(device_summary(info, *cuda_status()))
    _write_json(json, info)


def cmd_profile(models: list[str], parallel: str, batch: str, precision: str, device: str, prompt_len: str,
                gen_len: int, repeat: int, warmup: int, versus_dense: bool, law: str, output: str, format: str,
                threads: int | None, quiet: bool) -> None:
    from .profile import plan_profile, run_profile, save_plots, save_profile
    from .report import format_table, profile_header, profile_table, versus_dense_table

    if gen_len < 1 or repeat < 1 or warmup < 0:
        raise CLIError("--gen-len and --repeat must be >= 1 and --warmup >= 0")
    Ps, batches = _ints(parallel, check_range=True), _ints(batch, "--batch")
    prompt_lens = _ints(prompt_len, "--prompt-len")
    precisions = [p.strip() for p in precision.split(",")]
    bad = [p for p in precisions if p not in PROFILE_PRECISIONS]
    if bad:
        raise CLIError(f"unknown precision {bad[0]!r} in --precision; use {', '.join(PROFILE_PRECISIONS)}")
    jobs = plan_profile(models, Ps, precisions, threads, versus_dense, law, progress=not quiet)
    settings = {"models": models, "parallel": parallel, "batch": batch, "precision": precision,
                "prompt_len": prompt_len, "gen_len": gen_len, "threads": threads, "repeat": repeat, "warmup": warmup,
                "versus_dense": versus_dense, "law": law, "device": device}
    result = run_profile(jobs, batches, prompt_lens, gen_len, threads, repeat, warmup, device=device,
                         versus_dense=versus_dense, settings=settings, progress=not quiet)
    files = save_profile(result, output)
    info, rows, summary = result["machine"], result["rows"], result["versus_dense"]
    say = print if format == "md" else _log  # csv/json: stdout holds the table alone
    say(profile_header(info, rows, threads))
    _print_table(profile_table(rows), format)
    if summary:
        if format == "md":
            print()
            _print_table(versus_dense_table(summary), format)
        else:
            _log("\n" + format_table(versus_dense_table(summary), "md").rstrip())
    title = f"{', '.join(models)} on {info['cpu']['model']} ({threads or 'default'} threads)"
    try:
        say("plots: " + ", ".join(str(p) for p in save_plots(result, output, title)))
    except ImportError:
        say("plots skipped: matplotlib is not installed (pip install 'parscale-edge[profile]')")
    say(f"results: {', '.join(map(str, files))}")


def cmd_scaling_law(action: str, csv: str | None, dataset: str | None, params: str | None, parallel: str | None,
                    law: str, json: str | None, format: str) -> None:
    from . import scaling_law as sl
    from .report import fit_table, predict_table

    if action == "fit":
        path = csv or str(sl.PAPER_RUNS_CSV)
        rows = sl.fit_rows(path, dataset)
        _print_table(fit_table(rows, f"fit of L = (A / (N (k ln P + 1)))^alpha + E to {path} (Huber 1e-3 on log loss, "
                                     "L-BFGS-B, grid of starts)"), format)
        _write_json(json, {r["dataset"]: {"E": r["E"], "A": r["A"], "k": r["k"], "alpha": r["alpha"], "r2": r["r2"],
                                          "runs": r["runs"]} for r in rows})
        return
    if params is None or parallel is None:
        raise CLIError("predict needs --params N (non-embedding parameters) and --parallel P")
    N = sl.parse_count(params)
    # computed first: bad input fails before any output
    rows = sl.predict_rows(sl.paper_law(law), N, _ints(parallel))
    _print_table(predict_table(rows, f"{law} law (paper constants): N = {N:.4g} non-embedding parameters"), format)
    _write_json(json, {"law": law, "N": N, "rows": rows})


# ------------------------------------------------------------------------- generate, chat, demo
def _sampling(a: argparse.Namespace):
    """SamplingConfig of the flags (:meth:`parscale_edge.runtime.SamplingConfig.asked`: greedy unless
    --do-sample, --temperature > 0, --top-k or --top-p asks for sampling)."""
    from .runtime import SamplingConfig

    sampling = SamplingConfig.asked(a.max_new_tokens, a.temperature, a.do_sample, a.top_k, a.top_p, a.seed)
    if a.seed is not None and sampling.greedy:
        _log("note: --seed has no effect on greedy decoding; add --do-sample (temperature 1) to sample")
    return sampling


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


def cmd_generate(model: str, parallel: int | None, sampling, prompt: str | None, chat: bool, verbose: bool,
                 device: str, threads: int | None, quiet: bool) -> None:
    rt = _open(model, parallel, device, threads, quiet)
    prompt = prompt if prompt is not None else _read_stdin()
    t0 = time.perf_counter()
    n = 0
    for piece in rt.stream_text(prompt, sampling, chat=chat):
        n += 1
        print(piece, end="", flush=True)
    print(flush=True)  # the text ends before the stats line on stderr
    if n == 0:  # said on stderr: an empty answer with exit 0 looks like a hang or a crash
        why = "the model ended at once (its first token was an end token) and wrote nothing"
        if not chat and rt.tokenizer.chat_template:
            why += ("; it has a chat template, so it is probably a chat (instruct) model: try --chat, which wraps "
                    "the prompt in its template")
        _log(f"warning: {why}")
    if verbose:
        _log(f"[{n} pieces in {time.perf_counter() - t0:.2f} s, P={rt.P}, {rt.folder}]")


def cmd_chat(model: str, parallel: int | None, sampling, system: str | None, device: str, threads: int | None,
             quiet: bool) -> None:
    from .runtime import RuntimeInputError

    rt = _open(model, parallel, device, threads, quiet)
    history: list[dict] = []
    if system:
        history.append({"role": "system", "content": system})
    _log(f"chatting with {model} (P={rt.P}, {rt.session.get_providers()[0]}); /reset clears history, "
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
            history = history[:1] if system else []
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


def cmd_demo(left: str | None, left_parallel: str | None, right: str | None, right_parallel: str | None,
             precision: str | None, host: str, port: int | None, share: bool, concurrency: int, max_new_tokens: int,
             device: str, threads: int | None, quiet: bool) -> None:
    from parscale_edge.demo.models import DEFAULTS, PRECISIONS

    left, right, precision = left or DEFAULTS.left, right or DEFAULTS.right, precision or DEFAULTS.precision
    if precision not in PRECISIONS:
        raise CLIError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    left_P = _ints(left_parallel, "--left-parallel") if left_parallel is not None else None
    right_P = _ints(right_parallel, "--right-parallel") if right_parallel is not None else None
    if concurrency < 1 or max_new_tokens < 1:
        raise CLIError(f"--concurrency and --max-new-tokens must be >= 1, got {concurrency} and {max_new_tokens}")
    if port is not None and not 0 < port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {port}")
    if port is not None:
        _check_port(host, port)  # before loading the models (minutes)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CLIError("the demo needs gradio: pip install 'parscale-edge[demo]'") from None
    from parscale_edge.demo.app import build_app, launch
    from parscale_edge.demo.models import load_pair

    lm_left, lm_right = load_pair(left, left_P, right, right_P, precision, threads, device, progress=not quiet, log=_log)
    if not lm_left.ok and not lm_right.ok:
        raise CLIError(f"neither model loaded: left: {lm_left.error}; right: {lm_right.error}")
    app = build_app(lm_left, lm_right, concurrency=concurrency, max_new_tokens=max_new_tokens, threads=threads)
    launch(app, host, port, share=share)


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


def _add_parallel(p: argparse.ArgumentParser, help: str | None = None, *, several: bool = False,
                  default: str | None = None, required: bool = False, flags: Sequence[str] = ("--parallel", "-P"),
                  metavar: str | None = None) -> None:
    """Declare P: one integer, or with ``several`` a comma-separated list kept as text (the command
    reads it with :func:`_ints`, whose errors are one line naming the flag)."""
    if several:
        p.add_argument(*flags, default=default, required=required, help=help, metavar=metavar)
    else:
        p.add_argument(*flags, type=int, default=default, required=required, help=help, metavar=metavar)


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["md", "csv", "json"], default="md",
                   help="how the results table is printed: md (markdown, default), csv or json")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"export folder, named model, .gguf or HF folder (default {DEFAULT_MODEL})")
    _add_parallel(p, "P streams: converts a dense model to P streams before exporting (cached)")
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
    g.add_argument("--calibration", default=None, help="text file for GPTQ calibration and the --kv-cache int8 scales")
    g.add_argument("--keep-lm-head", action="store_true", help="leave the output head in float")
    g.add_argument("--quantize-embedding", action="store_true", help="int4 embedding (GatherBlockQuantized)")
    g.add_argument("--no-gguf-blocks", action="store_true",
                   help="re-round everything instead of reusing a GGUF source's quantized blocks")
    g.add_argument("--text", default=None, help="text for the quality check (default: held-out stdlib code)")
    g.add_argument("--check-positions", type=int, default=2048, help="accuracy_level check positions (0: skip)")
    g.add_argument("--compare-positions", type=int, default=1024, help="quality-vs-fp32 positions (0: skip)")
    g.add_argument("--kv-cache", default=None,
                   help="float (default: the graph's own float type) or int8: a fused graph's KV cache in int8 with "
                        "static per-channel scales calibrated on --calibration (default held-out stdlib code); 4x "
                        "less KV memory than float32, not faster on CPUs")


#: the demo's defaults as its help shows them (parscale_edge.demo.models.DEFAULTS holds the values; a
#: test checks that these agree, so that `parscale --help` need not import the demo)
DEMO_DEFAULTS_HELP = {"left": "smollm2-135m", "left_parallel": "2,1,4", "right": "qwen2.5-coder-0.5b",
                      "right_parallel": "1", "precision": "int4"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="parscale", description="ParScale language models on small devices: "
                                 "export to ONNX, quantize, run, train adapters and profile")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (ONNX Runtime intra-op; PyTorch: 1)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True)
    # the global options are accepted after the subcommand too (`parscale generate --threads 2`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                        help="CPU threads (ONNX Runtime intra-op; PyTorch: 1)")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    add_parser = sub.add_parser
    sub.add_parser = lambda *args, **kw: add_parser(*args, parents=[common], **kw)  # type: ignore[method-assign]

    p = sub.add_parser("export", help="export a model to ONNX (P folded into the batch axis, KV cache in/out)")
    p.add_argument("model", help="named model, .gguf file or Hugging Face folder")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    _add_parallel(p, "convert a dense model to P streams first; a list (1,2,4) puts one backbone and the "
                     "ParScale parts of every P in one folder (the first is the default)", several=True)
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
    p.add_argument("--precision", default=None,
                   help="int4 (default, unless --kv-cache int8 is given alone: weights unchanged), int8 or "
                        "int8-dynamic")
    p.add_argument("--overwrite", action="store_true")
    _add_quant_args(p)
    p.set_defaults(func=cmd_quantize)

    for name, fn, hlp in (("eval", cmd_eval, "perplexity of a model on a text (sliding window)"),
                          ("compare", cmd_compare, "KL divergence / top-1 agreement of a candidate vs a reference")):
        p = sub.add_parser(name, help=hlp)
        if name == "eval":
            p.add_argument("model")
            _add_parallel(p, "P to run (a folder offering several: default its own; a dense model: converted first)")
        else:
            p.add_argument("reference")
            p.add_argument("candidate")
            _add_parallel(p, "P to run the reference at (a folder offering several; default its own)",
                          flags=["--reference-parallel"], metavar="P")
            _add_parallel(p, "P to run the candidate at", flags=["--candidate-parallel"], metavar="P")
        p.add_argument("--text", default=None, help="UTF-8 text file (default: held-out Python stdlib code)")
        p.add_argument("--window", type=int, default=None, help="tokens per window (default 512, at most the context)")
        p.add_argument("--stride", type=int, default=None, help="default window/2")
        p.add_argument("--max-positions", type=int, default=4096, help="positions scored at most (default 4096)")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
        p.add_argument("--json", default=None, help="also write the result as JSON here")
        _add_format(p)
        p.set_defaults(func=fn)

    p = sub.add_parser("scaling-law", help="fit the parallel scaling law, or predict with it (paper Eq. 5)")
    p.add_argument("action", choices=["fit", "predict"])
    p.add_argument("csv", nargs="?", default=None, help="fit: runs CSV (dataset,P,non_embedding_params,loss); "
                   "default: the paper's 48 runs")
    p.add_argument("--dataset", default=None, help="fit only this dataset")
    p.add_argument("--params", "-N", default=None, help="predict: non-embedding parameters (1.6e9 or 1.6B)")
    _add_parallel(p, "predict: comma-separated P", several=True, default="1,2,4,8")
    p.add_argument("--law", default="stack-v2-python", choices=["stack-v2-python", "pile"])
    p.add_argument("--json", default=None)
    _add_format(p)
    p.set_defaults(func=cmd_scaling_law)

    p = sub.add_parser("device-info", help="CPU/GPU description and measured memory bandwidth (cached)")
    p.add_argument("--refresh", action="store_true", help="measure the bandwidth again")
    p.add_argument("--json", default=None)
    p.set_defaults(func=cmd_device_info)

    p = sub.add_parser("profile", help="latency and memory on this device: P against parameter scaling")
    p.add_argument("models", nargs="*", default=[DEFAULT_MODEL], help=f"models or export folders (default {DEFAULT_MODEL})")
    _add_parallel(p, "comma-separated P values (default 1,2,4,8)", several=True, default="1,2,4,8")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,fp16,bf16,int8,int4")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the models run (auto: CUDA when it works, else CPU); GPU runs report GPU memory")
    p.add_argument("--prompt-len", default="64", help="comma-separated prompt lengths")
    p.add_argument("--gen-len", type=int, default=128, help="decode steps timed per request (default 128)")
    p.add_argument("--repeat", type=int, default=3, help="timed requests per setting (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    p.add_argument("--versus-dense", action="store_true",
                   help="also profile, per P, a dense model of the scaling law's equivalent size")
    p.add_argument("--law", default="stack-v2-python", choices=["stack-v2-python", "pile"],
                   help="scaling-law constants used for the dense equivalent (the paper's fits, `parscale scaling-law`)")
    p.add_argument("-o", "--output", required=True, help="results folder (JSON, CSV, PNG)")
    _add_format(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("convert", help="turn a dense model into a ParScale one (authors' HF format)")
    p.add_argument("model")
    _add_parallel(p, "P streams (>= 2)", required=True)
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
    _add_parallel(p, "P streams (>= 2; 1 with --prefix)", required=True)
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

    d = DEMO_DEFAULTS_HELP
    p = sub.add_parser("demo", help="web demo: a ParScale model and a larger dense model answer side by side (gradio)")
    p.add_argument("--left", default=None, help=f"the ParScale side (default {d['left']})")
    _add_parallel(p, "P the left model offers, one backbone for all (the first is selected at start; default "
                     f"{d['left_parallel']}; an export folder: every P it offers)", several=True,
                  flags=["--left-parallel"], metavar="P[,P...]")
    p.add_argument("--right", default=None, help=f"the dense side (default {d['right']})")
    _add_parallel(p, f"P of the right model (default {d['right_parallel']})", several=True,
                  flags=["--right-parallel"], metavar="P[,P...]")
    p.add_argument("--precision", default=None,
                   help=f"fp32, int8 or int4 for models the demo exports (default {d['precision']}; "
                        "export folders run as they are)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--concurrency", type=int, default=2, help="answers decoded at once; more requests queue (default 2)")
    p.add_argument("--max-new-tokens", "-n", type=_count_arg, default=256, help="initial max new tokens (default 256)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.set_defaults(func=cmd_demo)
    return ap


# ------------------------------------------------------------------------------------------ main
def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def _call(a: argparse.Namespace) -> None:
    """Run the command ``a.func`` with the flag values its signature names; ``quant`` (the
    quantization group) and ``sampling`` (generate/chat) are built from their flags first."""
    params = inspect.signature(a.func).parameters
    kw = {k: v for k, v in vars(a).items() if k in params}
    if "quant" in params:
        kw["quant"] = QuantFlags(**{k: getattr(a, k) for k in QuantFlags.__dataclass_fields__})
    if "sampling" in params:
        kw["sampling"] = _sampling(a)  # validate flags before any loading/export
    a.func(**kw)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _show_warning
    a = build_parser().parse_args(argv)
    try:
        if getattr(a, "threads", None) is not None and a.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {a.threads} (leave it out for ONNX Runtime's default)")
        _check_paths(a)
        _call(a)
    except _user_errors() as e:
        msg = e.naming("--parallel") if isinstance(e, ParallelError) else e
        print(f"error: {_environment_error(e) or msg}", file=sys.stderr)
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


def _check_paths(a: argparse.Namespace) -> None:
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
