"""Interleaved A/B of two (source tree, export folder) pairs: prefill and decode time per P.

Each trial is a fresh process that imports ``parscale_edge.runtime`` from its side's source tree
(not the installed copy; :func:`source_path`), loads its export folder (``OnnxCausalLM``,
``--threads`` intra-op threads), runs a ``--prompt-len`` prompt of
fixed random ids, then ``--steps`` greedy decode steps, for each P in ``--parallel``. The two
sides alternate (A B, B A, ...) for ``--rounds`` rounds, so drift of a shared machine hits both;
the report gives per-round paired ratios B/A and their median. Timings go to JSON (``-o``) with the
machine described, never into unit tests.

    python bench/ab_decode.py --a /work/base /tmp/old-int4 --b . /tmp/new-int4 -P 1,4 --rounds 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

TRIAL = r"""
import importlib, json, os, sys, time
import numpy as np
folder, threads, prompt_len, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
Ps = json.loads(sys.argv[5])  # read by parse_parallel in the parent: either tree's runtime gets a plain list
runtime = importlib.import_module(sys.argv[6])  # parscale_edge.runtime, or edge.runtime in a tree from before the rename
tree = os.path.realpath(sys.argv[7])
if not os.path.realpath(runtime.__file__).startswith(tree + os.sep):  # never time another tree's code
    sys.exit(f"{sys.argv[6]} was imported from {runtime.__file__}, not from {tree}")
OnnxCausalLM = runtime.OnnxCausalLM
rt = OnnxCausalLM(folder, device="cpu", threads=threads)
ids = np.random.default_rng(0).integers(100, rt.manifest.vocab_size - 100, prompt_len).tolist()
out = {}
for P in Ps:
    for warm in (True, False):
        t0 = time.perf_counter()
        st, logits = rt.prefill([ids], steps + 1, parallel=P)
        t1 = time.perf_counter()
        times = []
        for _ in range(steps):
            tok = logits.argmax(-1)
            a = time.perf_counter()
            logits = rt.decode(st, tok)
            times.append(time.perf_counter() - a)
        st.close()
    out[P] = {"prefill_ms": 1e3 * (t1 - t0), "decode_ms": 1e3 * sum(times) / len(times),
              "decode_ms_median": 1e3 * sorted(times)[len(times) // 2]}
print(json.dumps(out))
"""


def source_path(tree: str) -> tuple[str, str]:
    """(PYTHONPATH entry, runtime module) that import ``tree``'s own code without installing it.

    A tree with the one package (pyproject maps edge/ to ``parscale_edge``): a temporary folder
    holding ``parscale_edge/`` as links to edge/*, with export/, quant/, demo/ beside them (the
    layout an install gives). An older tree (top-level ``edge``): the tree itself."""
    tree = os.path.abspath(tree)
    pyproject = os.path.join(tree, "pyproject.toml")
    if not (os.path.exists(pyproject) and "parscale_edge" in open(pyproject).read()):
        return tree, "edge.runtime"
    import tempfile

    links = os.path.join(tempfile.mkdtemp(prefix="ab-src-"), "parscale_edge")
    os.mkdir(links)
    for name in os.listdir(os.path.join(tree, "edge")):
        os.symlink(os.path.join(tree, "edge", name), os.path.join(links, name))
    for sub in ("export", "quant", "demo"):
        os.symlink(os.path.join(tree, sub), os.path.join(links, sub))
    return os.path.dirname(links), "parscale_edge.runtime"


def trial(tree: str, folder: str, parallel: list[int], a: argparse.Namespace) -> dict:
    """One trial process: ``{P: {prefill_ms, decode_ms, decode_ms_median}}`` of ``folder`` run from ``tree``."""
    path, module = source_path(tree)
    env = {**os.environ, "PYTHONPATH": path}
    # cwd too: ``python -c`` puts the working directory first on sys.path
    r = subprocess.run([sys.executable, "-c", TRIAL, os.path.abspath(folder), str(a.threads), str(a.prompt_len),
                        str(a.steps), json.dumps(parallel), module, tree],
                       env=env, cwd=tree, capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"trial failed ({tree}, {folder}): {r.stderr.strip().splitlines()[-1:]}")
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", nargs=2, metavar=("TREE", "FOLDER"), required=True, help="baseline: source tree, export folder")
    p.add_argument("--b", nargs=2, metavar=("TREE", "FOLDER"), required=True, help="candidate: source tree, export folder")
    p.add_argument("-P", "--parallel", default="1,4", help="P values to time, comma-separated")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("-o", "--output", help="JSON file for the results")
    a = p.parse_args()
    from parscale_edge.prepare import ParallelError, parse_parallel

    try:
        parallel = parse_parallel(a.parallel)
    except ParallelError as e:
        p.error(e.naming("--parallel"))
    rounds = []
    for r in range(a.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        res = {side: trial(*getattr(a, side), parallel, a) for side in order}
        rounds.append(res)
        print(f"round {r + 1}: " + "  ".join(
            f"P={P} decode {res['a'][P]['decode_ms']:.2f} -> {res['b'][P]['decode_ms']:.2f} ms, "
            f"prefill {res['a'][P]['prefill_ms']:.1f} -> {res['b'][P]['prefill_ms']:.1f} ms" for P in res["a"]), flush=True)
    summary = {}
    for P in rounds[0]["a"]:
        for key in ("decode_ms", "prefill_ms"):
            ratios = [x["b"][P][key] / x["a"][P][key] for x in rounds]
            summary[f"P{P}_{key}_ratio_b_over_a"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                      "max": max(ratios)}
            summary[f"P{P}_{key}_a_median"] = statistics.median(x["a"][P][key] for x in rounds)
            summary[f"P{P}_{key}_b_median"] = statistics.median(x["b"][P][key] for x in rounds)
    for k, v in summary.items():
        print(f"{k}: {v if not isinstance(v, dict) else ', '.join(f'{n} {x:.3f}' for n, x in v.items())}")
    if a.output:
        machine = {"cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                               platform.processor()), "cores": os.cpu_count(), "python": platform.python_version(),
                   "load_avg_at_end": os.getloadavg()}
        json.dump({"machine": machine, "args": vars(a), "rounds": rounds, "summary": summary,
                   "when": time.strftime("%Y-%m-%d %H:%M:%S")}, open(a.output, "w"), indent=1)


if __name__ == "__main__":
    main()
