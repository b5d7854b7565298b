"""P streams against llama.cpp's multi-sequence decode: what a step costs as it carries more rows.

A ParScale step at P runs P rows, each with its own KV cache (the prefix differs per stream), like
llama.cpp decoding B independent sequences, each after its own prompt (``llama-batched-bench``
without ``-pps``: N_KV = B*(PP+TG)). This times both at the same threads, prompt and new tokens:

* llama.cpp: ``llama-batched-bench`` built from the llama.cpp source that the llama-cpp-python
  sdist carries (``vendor/llama.cpp``; one cached build under ``$PARSCALE_EDGE_CACHE/peers``), on
  the project's smollm2-135m GGUF (Q4_1): step ms = T_TG / TG for each B.
* ours: an int4 export offering every P (``parscale export smollm2-135m -P 1,2,4,8 --precision
  int4``, made once in the same cache unless ``--ours`` names one), ``OnnxCausalLM`` at each P,
  batch 1: step ms = median of the timed decode steps (:func:`parscale_edge.profile.time_request`).

Both sides run in ``--rounds`` interleaved rounds; the table gives each side's step time and its
ratio to one row (B=1, P=1), the medians over rounds of ratios measured within a round. Each round
also runs ``llama-bench`` (same build) for one sequence, ``-p 0 -n GEN -d PROMPT``: its step is the
cross-check of llama-batched-bench's B=1 row.

``--kv-cache int8`` compares quantized caches: llama.cpp ``-ctk q8_0 -ctv q8_0`` (8-bit blocks of 32
with an fp16 scale; its flash attention, which a quantized V cache needs, is on), ours the int8
cache of ``--kv-cache int8`` (per-channel static scales). ``float`` (default): llama.cpp's f16
cache, ours float32.

    python bench/peers/batched.py --threads 1,2 --rounds 3 -o bench/results/batched_vs_parallel.json
    python bench/peers/batched.py --threads 1,2 --rounds 2 --prompt-len 2048 --kv-cache int8 \
        -o bench/results/batched_vs_parallel_2048_kv8.json

Needs cmake, a C++ compiler and the network (or a downloaded sdist) for the first build only.
Units: ms per decode step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # the version bench/peers/README.md builds for run.py
MODEL = "smollm2-135m"


def peers_cache() -> Path:
    """``$PARSCALE_EDGE_CACHE/peers``, where run.py keeps its builds too (:func:`run.peers_dir`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import peers_dir

    return peers_dir()


TARGETS = ("llama-batched-bench", "llama-bench")


def build_batched_bench(log=print) -> Path:
    """``llama-batched-bench`` and ``llama-bench`` of llama-cpp-python's vendored llama.cpp, built once
    (cached).

    Downloads the sdist with ``pip download --no-deps --no-binary :all:`` when it is not in the cache,
    configures with cmake (Release, GGML_NATIVE, no curl, no tests/examples/server) and builds the
    :data:`TARGETS`. Returns the folder holding both binaries. Raises RuntimeError naming the failing
    step."""
    root = peers_cache()
    bindir = root / f"llama.cpp-{LLAMA_CPP_PYTHON}-build" / "bin"
    if all((bindir / t).exists() for t in TARGETS):
        return bindir
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)], capture_output=True, text=True)
        if r.returncode or not sdist.exists():
            raise RuntimeError(f"pip download of llama-cpp-python=={LLAMA_CPP_PYTHON} failed: {r.stderr[-500:]}")
    src = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not src.exists():
        with tarfile.open(sdist) as t:
            t.extractall(root, filter="data")
    llama = src / "vendor" / "llama.cpp"
    build = bindir.parent
    for step, cmd in (("configure", ["cmake", "-S", str(llama), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                                     "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]),
                      ("build", ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2),
                                 "--target", *TARGETS])):
        log(f"llama.cpp {step} ...")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"llama.cpp {step} failed ({' '.join(cmd[:3])} ...): {(r.stdout + r.stderr)[-800:]}")
    return bindir


def cache_flags(kv_cache: str) -> list[str]:
    """llama.cpp's cache flags for our ``--kv-cache`` value: ``int8`` -> q8_0 keys and values (flash
    attention on: llama.cpp needs it for a quantized V cache), ``float`` -> its default f16."""
    return ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on"] if kv_cache == "int8" else []


def llama_steps(bindir: Path, gguf: Path, threads: int, batches: list[int], prompt: int, gen: int,
                kv_cache: str = "float") -> dict[int, dict]:
    """One ``llama-batched-bench`` run: ``{B: {"step_ms", "prefill_ms", "record"}}`` (step = T_TG/TG)."""
    ctx = max(batches) * (prompt + gen)
    cmd = [str(bindir / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(prompt), "-ntg", str(gen), "-npl", ",".join(map(str, batches)), "-t", str(threads),
           "-tb", str(threads), "--output-format", "jsonl", *cache_flags(kv_cache)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama-batched-bench failed: {(r.stdout + r.stderr)[-800:]}")
    out = {}
    for line in (r.stdout + "\n" + r.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and '"pl"' in line:
            rec = json.loads(line)
            out[rec["pl"]] = {"step_ms": 1e3 * rec["t_tg"] / rec["tg"], "prefill_ms": 1e3 * rec["t_pp"], "record": rec}
    missing = set(batches) - set(out)
    if missing:
        raise RuntimeError(f"llama-batched-bench printed no result for B={sorted(missing)}")
    return out


def llama_bench_step(bindir: Path, gguf: Path, threads: int, prompt: int, gen: int,
                     kv_cache: str = "float") -> dict:
    """One sequence in ``llama-bench`` (``-p 0 -n GEN -d PROMPT -r 1``): its decode step at a context of
    PROMPT tokens, ``{"step_ms", "record"}`` (step = 1000 / avg_ts)."""
    cmd = [str(bindir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(gen), "-d", str(prompt),
           "-t", str(threads), "-r", "1", "-o", "json", *cache_flags(kv_cache)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama-bench failed: {(r.stdout + r.stderr)[-800:]}")
    rec = json.loads(r.stdout)[0]
    return {"step_ms": 1e3 / rec["avg_ts"], "record": rec}


def ensure_ours(parallel: list[int], threads: int, kv_cache: str = "float") -> Path:
    """The int4 export offering every P of ``parallel`` (GGUF blocks reused; ``kv_cache="int8"``: its
    int8 KV cache), made once in the peers cache with ``python -m parscale_edge export`` (this
    interpreter's install: no activated venv needed)."""
    folder = peers_cache() / f"{MODEL}-p{'-'.join(map(str, parallel))}-int4{'-kv8' if kv_cache == 'int8' else ''}"
    if not (folder / "manifest.json").exists():
        cmd = [sys.executable, "-m", "parscale_edge", "--threads", str(threads), "-q", "export", MODEL,
               "-P", ",".join(map(str, parallel)), "--precision", "int4", "-o", str(folder), "--overwrite",
               "--check-positions", "0", "--compare-positions", "0",
               *(["--kv-cache", "int8"] if kv_cache == "int8" else [])]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-800:]}")
    return folder


def our_steps(folder: Path, threads: int, parallel: list[int], prompt: int, gen: int) -> dict[int, dict]:
    """``{P: {"step_ms", "prefill_ms"}}`` at batch 1 (median decode step of one request after a warmup)."""
    import numpy as np

    from parscale_edge.profile import time_request
    from parscale_edge.runtime import OnnxCausalLM

    out = {}
    for P in parallel:
        rt = OnnxCausalLM(folder, device="cpu", threads=threads, parallel=P)
        ids = np.random.default_rng(0).integers(100, rt.manifest.vocab_size - 100, prompt).tolist()
        time_request(rt, [ids[:16]], 4)  # warmup
        r = time_request(rt, [ids], gen)
        out[P] = {"step_ms": statistics.median(r["decode_ms"]), "prefill_ms": r["prefill_ms"], "kv_bytes": r["kv_bytes"]}
        del rt
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("-P", "--parallel", default="1,2,4,8", help="P (ours) and B (llama.cpp) values")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-cache", choices=("float", "int8"), default="float",
                    help="int8: llama.cpp -ctk q8_0 -ctv q8_0 against our --kv-cache int8 export "
                         "(default float: its f16 cache, our float32)")
    ap.add_argument("--ours", default=None, help="our int4 export offering every P (default: made once)")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    from parscale_edge.atomic import write_json
    from parscale_edge.device import device_info
    from parscale_edge.hub import fetch_gguf
    from parscale_edge.prepare import ParallelError, parse_parallel

    try:
        parallel, threads_list = parse_parallel(a.parallel), parse_parallel(a.threads)
    except ParallelError as e:
        print(f"error: {e.naming('--parallel/--threads')}", file=sys.stderr)
        return 2
    if parallel[0] != 1:
        print("error: --parallel must start with 1 (the ratios are to one row)", file=sys.stderr)
        return 2
    folder = Path(a.ours) if a.ours else ensure_ours(parallel, max(threads_list), a.kv_cache)
    from parscale_edge.manifest import KV_INT8, Manifest, ManifestError

    try:
        man = Manifest.read(folder)
    except ManifestError as e:
        print(f"error: --ours: {e}", file=sys.stderr)
        return 2
    if (man.cache_dtype == KV_INT8) != (a.kv_cache == "int8"):
        print(f"error: {folder}'s KV cache is {man.cache_dtype}, not --kv-cache {a.kv_cache}: "
              "pass the matching --kv-cache or another --ours", file=sys.stderr)
        return 2
    if set(parallel) - set(man.parallel_choices()):
        print(f"error: {folder} offers P={','.join(map(str, man.parallel_choices()))}, not all of --parallel "
              f"{','.join(map(str, parallel))}: pass another --ours or --parallel", file=sys.stderr)
        return 2
    bindir = build_batched_bench(log=lambda m: print(m, file=sys.stderr))
    gguf = fetch_gguf(MODEL)
    doc = {"what": __doc__.splitlines()[0], "machine": device_info(), "command": " ".join(sys.argv),
           "llama_cpp_python_sdist": LLAMA_CPP_PYTHON, "gguf": str(gguf), "ours": str(folder),
           "kv_cache": {"ours": man.cache_dtype,
                        "llama.cpp": "q8_0 keys and values, flash attention on" if a.kv_cache == "int8" else "f16"},
           "prompt_len": a.prompt_len, "gen_len": a.gen_len, "rounds": a.rounds, "rows": []}
    for threads in threads_list:
        rounds = []
        for r in range(a.rounds):
            sides = [("llama.cpp", lambda: llama_steps(bindir, gguf, threads, parallel, a.prompt_len, a.gen_len,
                                                       a.kv_cache)),
                     ("llama-bench", lambda: llama_bench_step(bindir, gguf, threads, a.prompt_len, a.gen_len,
                                                              a.kv_cache)),
                     ("ours", lambda: our_steps(folder, threads, parallel, a.prompt_len, a.gen_len))]
            res = {name: fn() for name, fn in (sides if r % 2 == 0 else sides[::-1])}
            rounds.append(res)
            print(f"threads {threads} round {r + 1}: " + "  ".join(
                f"{name} " + "/".join(f"{res[name][n]['step_ms']:.1f}" for n in parallel) + " ms"
                for name in ("llama.cpp", "ours")) + f"  llama-bench {res['llama-bench']['step_ms']:.1f} ms",
                file=sys.stderr, flush=True)
        for n in parallel:
            row = {"threads": threads, "rows": n}
            for name in ("llama.cpp", "ours"):
                steps = [rd[name][n]["step_ms"] for rd in rounds]
                ratios = [rd[name][n]["step_ms"] / rd[name][1]["step_ms"] for rd in rounds]
                row[name] = {"step_ms": statistics.median(steps), "step_ms_rounds": steps,
                             "ratio_to_one_row": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                             "prefill_ms": statistics.median(rd[name][n]["prefill_ms"] for rd in rounds)}
            doc["rows"].append(row)
        doc.setdefault("llama_bench_one_sequence", []).append(
            {"threads": threads, "step_ms": statistics.median(rd["llama-bench"]["step_ms"] for rd in rounds),
             "step_ms_rounds": [rd["llama-bench"]["step_ms"] for rd in rounds],
             "records": [rd["llama-bench"]["record"] for rd in rounds]})
    print(f"\n{MODEL}, prompt {a.prompt_len} + {a.gen_len} new tokens, {a.rounds} interleaved rounds, "
          f"KV cache: ours {doc['kv_cache']['ours']}, llama.cpp {doc['kv_cache']['llama.cpp']}; "
          "step ms (ratio to one row)")
    print("| threads | B = P | llama.cpp B sequences | ours P streams (int4) |\n| --- | --- | --- | --- |")
    for row in doc["rows"]:
        cells = [f"{row[s]['step_ms']:.1f} ({row[s]['ratio_to_one_row']:.2f}x)" for s in ("llama.cpp", "ours")]
        print(f"| {row['threads']} | {row['rows']} | {cells[0]} | {cells[1]} |")
    for lb in doc["llama_bench_one_sequence"]:
        print(f"llama-bench, one sequence at depth {a.prompt_len}, {lb['threads']} thread(s): {lb['step_ms']:.1f} ms")
    if a.output:
        write_json(Path(a.output), doc)
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
