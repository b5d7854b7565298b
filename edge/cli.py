"""``parscale`` command line: export, convert, generate, chat.

Every command that runs a model goes through ONNX Runtime; torch is imported only to load,
convert or export a checkpoint (the ``export`` extra). A model argument is an export folder, a
named model (``smollm2-135m``, ``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``), a ``.gguf`` file or a
Hugging Face folder; anything but an export folder is exported once into the cache and reused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
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
                                       FileExistsError, FileNotFoundError, ValueError]
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

    # On small shared CPUs PyTorch with several threads was 8-10x slower than with one (FINDINGS.md).
    torch.set_num_threads(threads or 1)


def _is_export_folder(spec: str) -> bool:
    return (Path(spec) / MANIFEST_FILE).exists()


def _cache_key(spec: str, parallel: int) -> str:
    from .hub import resolve_model

    kind, ref = resolve_model(spec)
    if kind == "named":
        base = ref
    else:
        p = Path(ref).resolve()
        st = p.stat()
        digest = hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        base = f"{p.stem or p.name}-{digest}"
    return f"{base}-p{parallel}-fp32"


def load_for_export(spec: str, parallel: int | None, threads: int | None, progress: bool = True, seed: int = 0):
    """Load ``spec`` into PyTorch; convert a dense model to ``parallel`` streams when asked."""
    _import_export_stack()
    _set_torch_threads(threads)
    from .loading import convert_to_parscale, load_model

    lm = load_model(spec, progress=progress)
    P = lm.model.config.parscale_n
    if parallel and parallel != P:
        if P != 1:
            raise CLIError(f"{spec} already has P={P} streams; --parallel {parallel} needs a dense (P=1) model")
        lm = convert_to_parscale(lm, parallel, seed=seed)
    return lm


def ensure_export(spec: str, parallel: int | None = None, threads: int | None = None, progress: bool = True) -> Path:
    """An export folder for ``spec``: itself when it is one, else a cached export (made once)."""
    if parallel is not None and parallel < 1:
        raise CLIError(f"--parallel must be >= 1, got {parallel}")
    if _is_export_folder(spec):
        man = Manifest.read(spec)
        if parallel and parallel != man.parscale_n:
            raise CLIError(f"{spec} was exported with P={man.parscale_n}; re-export with --parallel {parallel}")
        return Path(spec)
    from .hub import default_cache_dir

    out = Path(default_cache_dir()) / "onnx" / _cache_key(spec, parallel or 1)
    if (out / MANIFEST_FILE).exists():
        return out
    lm = load_for_export(spec, parallel, threads, progress)
    from export import export_onnx

    _log(f"exporting {spec} (P={lm.model.config.parscale_n}) to {out} ...")
    t0 = time.perf_counter()
    export_onnx(lm, out, overwrite=True)
    _log(f"exported in {time.perf_counter() - t0:.1f} s")
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------- commands
def cmd_export(a) -> None:
    lm = load_for_export(a.model, a.parallel, a.threads, progress=not a.quiet)
    from export import export_onnx

    out = export_onnx(lm, a.output, overwrite=a.overwrite)
    man = Manifest.read(out)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"exported {a.model} -> {out}  (P={man.parscale_n}, {man.num_layers} layers, {size:.1f} MiB)")


def cmd_convert(a) -> None:
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


def _sampling(a):
    from .runtime import SamplingConfig

    sample = a.temperature > 0 and (a.do_sample or a.temperature != 1.0 or a.top_k or a.top_p < 1.0)
    return SamplingConfig(max_new_tokens=a.max_new_tokens, do_sample=bool(a.do_sample or sample),
                          temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)


def _open_runtime(a):
    from .runtime import OnnxCausalLM

    folder = ensure_export(a.model, a.parallel, a.threads, progress=not a.quiet)
    return OnnxCausalLM(folder, device=a.device, threads=a.threads)


def cmd_generate(a) -> None:
    sampling = _sampling(a)  # validate flags before any loading/export
    rt = _open_runtime(a)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    t0 = time.perf_counter()
    n = 0
    for piece in rt.stream_text(prompt, sampling, chat=a.chat):
        n += 1
        print(piece, end="", flush=True)
    print()
    if a.verbose:
        _log(f"[{n} pieces in {time.perf_counter() - t0:.2f} s, P={rt.P}, {rt.folder}]")


def cmd_chat(a) -> None:
    sampling = _sampling(a)
    rt = _open_runtime(a)
    history: list[dict] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    _log(f"chatting with {a.model} (P={rt.P}, {rt.providers[0]}); /reset clears history, /exit or Ctrl-D quits")
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
        print()
        history += [{"role": "user", "content": msg}, {"role": "assistant", "content": "".join(answer)}]


# ---------------------------------------------------------------------------------------- parser
def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"export folder, named model, .gguf or HF folder (default {DEFAULT_MODEL})")
    p.add_argument("--parallel", "-P", type=int, default=None,
                   help="P streams: converts a dense model to P streams before exporting (cached)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--do-sample", action="store_true", help="sample (temperature 1 unless given)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="parscale", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (ONNX Runtime intra-op; PyTorch: 1)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a model to ONNX (P folded into the batch axis, KV cache in/out)")
    p.add_argument("model", help="named model, .gguf file or Hugging Face folder")
    p.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    p.add_argument("--parallel", "-P", type=int, default=None, help="convert a dense model to P streams first")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

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

    p = sub.add_parser("generate", help="generate from a prompt (streams to stdout)")
    _add_run_args(p)
    p.add_argument("--prompt", "-p", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_run_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.func(a)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
