"""How ParScale's P=4 / P=1 decode step falls with CPU cores: int4 decode ms/step at P = 1, 2, 4, 8
for each thread count (issue 14: edge CPUs have more than the 2 cores of the development machine).

The model has smollm2-135m's exact shapes (llama, 30 layers, hidden 576, 9 heads / 3 KV heads,
vocabulary 49152, tied embedding) with random weights: decode time does not depend on the values,
and neither the real GGUF (98.4 MB, and the GPU machine has no gguf package) nor an int4 export
(measured: 199.5 MB backbone with its float32 embedding + 49.6 MB of ParScale parts for P=2,4,8)
fits a 64 MiB transfer next to the repository; on the GPU machine torch builds this one in about a
minute (64 s export + 3 s int4 on 2 busy cores here). One fused fp32 backbone serves every P (a part
file per P > 1), then int4 MatMulNBits (block 32, accuracy_level 4: the CPU int4 path). Each
(P, threads) is timed in a fresh process (parscale_edge.profile.profile_folder), batch 1, most informative
first (P=1 and P=4 at every thread count, then P=2 and P=8), so a deadline drops the least useful
rows.

    python bench/cpu_threads.py -o OUT [--arch tiny-smollm2] [--threads 1,2,4,8,16] [--parallel 1,2,4,8]

``bench/gpu_check.py run`` runs it as its last step (``cpu_threads.json`` / ``cpu_threads.md``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LLAMA = dict(family="llama", rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
             parscale_n_tokens=48, parscale_attn_smooth=0.01)
ARCHS = {
    "smollm2-135m": dict(LLAMA, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192),
    # dry run: same family, a few MB
    "tiny-smollm2": dict(LLAMA, vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         parscale_n_tokens=8),
}


def build(arch: str, parallel: tuple[int, ...], work: Path, torch_threads: int | None = None) -> dict:
    """Random-weight fused fp32 export of ``arch`` serving every P of ``parallel``, then its int4
    variant; returns {"folder": int4 folder, "export_s", "quantize_s"}. Needs torch."""
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    from parscale_edge.config import ParScaleConfig
    from parscale_edge.loading import convert_to_parscale
    from parscale_edge.profile import quantized_folder, random_model
    from parscale_edge.export import export_model

    t0 = time.perf_counter()
    fp32 = Path(work) / f"{arch}-cpu-fp32"
    if not (fp32 / "manifest.json").exists():
        dense = random_model(ParScaleConfig(**ARCHS[arch], parscale_n=1), f"random weights, {arch} shapes")
        models = [dense if P == 1 else convert_to_parscale(dense, P, n_tokens=ARCHS[arch]["parscale_n_tokens"])
                  for P in sorted(set(parallel))]
        export_model(models[0], fp32, overwrite=True, graph="fused", extra_parallel=models[1:], precision="fp32")
    t1 = time.perf_counter()
    folder = quantized_folder(fp32, "int4", threads=torch_threads)
    return {"folder": str(folder), "export_s": t1 - t0, "quantize_s": time.perf_counter() - t1}


def order(parallel: tuple[int, ...], threads: tuple[int, ...]) -> list[tuple[int, int]]:
    """(P, threads) pairs, most informative first: P=1 and P=4 at every thread count, then the rest."""
    first = [(P, t) for t in threads for P in parallel if P in (1, 4)]
    return first + [(P, t) for t in threads for P in parallel if (P, t) not in first]


def measure(folder: str, parallel: tuple[int, ...], threads: tuple[int, ...], prompt_len: int = 32,
            gen_len: int = 32, repeat: int = 1, warmup: int = 1, budget_s: float = 3600.0) -> dict:
    """Decode ms/step (p50) and TTFT per (P, threads), batch 1; pairs that do not fit ``budget_s``
    are listed under ``skipped``."""
    from parscale_edge.profile import profile_folder

    t0 = time.perf_counter()
    rows, skipped = [], []
    for P, t in order(parallel, threads):
        left = budget_s - (time.perf_counter() - t0)
        if left < 5:
            skipped.append(f"P={P} threads={t}: deadline")
            continue
        try:
            (r,) = profile_folder(folder, [1], [prompt_len], gen_len, t, repeat, warmup, None,
                                  timeout_s=max(5.0, left), device="cpu", parallel=P)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            skipped.append(f"P={P} threads={t}: {str(e)[-200:]}")
            continue
        rows.append({"P": P, "threads": t, "decode_ms_p50": r["decode_ms_p50"], "ttft_ms": r["ttft_ms"],
                     "provider": r["provider"], "precision": r["precision"]})
    return {"rows": rows, "skipped": skipped, "cpu_count": os.cpu_count(), "prompt_len": prompt_len,
            "gen_len": gen_len, "batch": 1, "seconds": round(time.perf_counter() - t0, 1),
            "ratios": ratios(rows)}


def ratios(rows: list[dict], num: int = 4, den: int = 1) -> dict[str, float]:
    """threads -> decode ms/step at P=``num`` over P=``den`` (where both were measured)."""
    ms = {(r["P"], r["threads"]): r["decode_ms_p50"] for r in rows}
    return {str(t): ms[num, t] / ms[den, t] for (P, t) in sorted(ms, key=lambda k: k[1])
            if P == den and (num, t) in ms}


def markdown(res: dict, title: str) -> str:
    Ps = sorted({r["P"] for r in res["rows"]})
    ts = sorted({r["threads"] for r in res["rows"]})
    ms = {(r["P"], r["threads"]): r["decode_ms_p50"] for r in res["rows"]}
    lines = [f"### {title}", "", "int4 decode ms/step (p50), batch 1, prompt {prompt_len}, {gen_len} steps; "
             "random weights".format(**res), "",
             "| threads | " + " | ".join(f"P={P}" for P in Ps) + " | P=4 / P=1 |",
             "| --- |" + " --- |" * (len(Ps) + 1)]
    for t in ts:
        cells = [f"{ms[P, t]:.2f}" if (P, t) in ms else "-" for P in Ps]
        r = res["ratios"].get(str(t))
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {f'{r:.2f}x' if r else '-'} |")
    lines += [f"- skipped: {s}" for s in res["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--arch", default="smollm2-135m", choices=sorted(ARCHS))
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--parallel", default="1,2,4,8")
    ap.add_argument("--work", default="/tmp/parscale-cpu-threads")
    ap.add_argument("--budget-s", type=float, default=3600.0)
    a = ap.parse_args(argv)
    from parscale_edge.atomic import write_json
    from parscale_edge.prepare import parse_parallel

    parallel = tuple(parse_parallel(a.parallel))
    threads = tuple(int(x) for x in a.threads.split(","))
    built = build(a.arch, parallel, Path(a.work))
    res = {"arch": a.arch, **built, **measure(built["folder"], parallel, threads, budget_s=a.budget_s)}
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "cpu_threads.json", res)
    (out / "cpu_threads.md").write_text(markdown(res, f"{a.arch} (random weights) on {os.cpu_count()} CPUs"))
    print((out / "cpu_threads.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
