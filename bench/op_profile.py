"""Where a decode step's time goes, per operator type: ONNX Runtime's profiler over our export at
each P and thread count, and over an onnxruntime-genai model folder beside it.

For every (model, P, threads) one fresh process loads the model with ``enable_profiling``, runs a
``--prompt-len`` prompt of fixed random ids and ``--steps`` greedy decode steps, and reads the
profile: the first ``model_run`` (the prompt) is dropped, the others are the decode steps, and every
kernel event inside them is summed per operator type. Reported per step (means over the steps):
kernel microseconds and node count per op type, the ``model_run`` time, and the part of it outside
kernels (ONNX Runtime's per-node cost). Profiling itself costs per node (10-50% here): compare shares
and differences within one run, not absolute times or P ratios with unprofiled benchmarks.

Make the folder of the committed run with ``parscale export smollm2-135m -P 1,4 --precision int4 -o
/tmp/ab/base`` (an int4 export offering P=1 and P=4).

    .venv-peers/bin/python bench/op_profile.py --ours FOLDER -P 1,4 --threads 1,2 \\
        --genai $PARSCALE_EDGE_CACHE/peers/smollm2-135m-ortgenai-int8 -o bench/results/op_profile.json

``--genai`` needs onnxruntime-genai (the peers' venv, bench/peers/README.md).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

OURS = r"""
import json, sys
import numpy as np
import onnxruntime as ort
folder, P, threads, prefix, prompt_len, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
_SO = ort.SessionOptions
def profiled():
    so = _SO(); so.enable_profiling = True; so.profile_file_prefix = prefix; return so
ort.SessionOptions = profiled  # OnnxCausalLM builds its options through this name
from parscale_edge.runtime import OnnxCausalLM
rt = OnnxCausalLM(folder, device="cpu", threads=threads, parallel=P)
ids = np.random.default_rng(0).integers(100, rt.manifest.vocab_size - 100, prompt_len).tolist()
st, logits = rt.prefill([ids], steps + 1, parallel=P)
for _ in range(steps):
    logits = rt.decode(st, logits.argmax(-1))
print(json.dumps({"profile": rt.session.end_profiling()}))
"""

GENAI = r"""
import glob, json, os, shutil, sys
import numpy as np
import onnxruntime_genai as og
src, threads, prefix, prompt_len, steps, work = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
dst = os.path.join(work, "model")
shutil.copytree(src, dst)
cfg = json.load(open(os.path.join(dst, "genai_config.json")))
so = cfg["model"]["decoder"]["session_options"]
so["intra_op_num_threads"] = threads
so["enable_profiling"] = prefix
json.dump(cfg, open(os.path.join(dst, "genai_config.json"), "w"))
m = og.Model(dst)
p = og.GeneratorParams(m)
p.set_search_options(max_length=prompt_len + steps + 1, do_sample=False)
g = og.Generator(m, p)
g.append_tokens(np.random.default_rng(0).integers(100, 40000, prompt_len).astype(np.int32))
for _ in range(steps):
    g.generate_next_token()
del g, m  # the profile is written when the session closes
print(json.dumps({"profile": sorted(glob.glob(prefix + "*.json"), key=os.path.getmtime)[-1]}))
"""


def aggregate(path: str | Path) -> dict:
    """Per-op-type kernel time of the decode steps in one ONNX Runtime profile (chrome-trace JSON): every
    ``model_run`` after the first (the prompt).

    Returns ``{"steps", "run_us", "kernel_us", "nodes", "outside_kernels_us", "ops": {op: {"us",
    "nodes", "share"}}}``, all means per step (microseconds). Raises ValueError on a profile without
    a decode step."""
    ev = json.loads(Path(path).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"], e["dur"]) for e in ev
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) < 2:
        raise ValueError(f"{path}: {len(runs)} model_run events, no decode step after the prompt")
    steps = runs[1:]
    starts = [r[0] for r in steps]
    us, cnt = collections.defaultdict(float), collections.Counter()
    for e in ev:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > steps[i][1]:
            continue
        op = e["args"]["op_name"]
        us[op] += e["dur"]
        cnt[op] += 1
    n, total = len(steps), sum(us.values())
    run_us = sum(r[2] for r in steps) / n
    return {"steps": n, "run_us": round(run_us, 1), "kernel_us": round(total / n, 1),
            "nodes": round(sum(cnt.values()) / n, 1), "outside_kernels_us": round(run_us - total / n, 1),
            "ops": {op: {"us": round(t / n, 1), "nodes": round(cnt[op] / n, 1), "share": round(t / total, 4)}
                    for op, t in sorted(us.items(), key=lambda kv: -kv[1])}}


def profile_one(code: str, args: list[str], work: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"profiling run failed: {(r.stdout + r.stderr)[-800:]}")
    return aggregate(json.loads(r.stdout.strip().splitlines()[-1])["profile"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ours", required=True, help="our export folder")
    ap.add_argument("-P", "--parallel", default="1", help="P values for ours, comma-separated")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--genai", default=None, help="an onnxruntime-genai model folder to profile beside ours")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=8, help="op types printed per row")
    ap.add_argument("-o", "--output", default=None, help="JSON file for the results")
    a = ap.parse_args()
    from parscale_edge.atomic import write_json
    from parscale_edge.device import device_info
    from parscale_edge.prepare import ParallelError, parse_parallel

    try:
        Ps, threads = parse_parallel(a.parallel), parse_parallel(a.threads)
    except ParallelError as e:
        print(f"error: {e.naming('--parallel/--threads')}", file=sys.stderr)
        return 2
    from parscale_edge.manifest import Manifest, ManifestError

    try:
        offered = Manifest.read(Path(a.ours)).parallel_choices()
    except ManifestError as e:
        print(f"error: --ours: {e}", file=sys.stderr)
        return 2
    if set(Ps) - set(offered):
        print(f"error: {a.ours} offers P={','.join(map(str, offered))}, not P={','.join(map(str, sorted(set(Ps) - set(offered))))}: "
              "pass -P from those, or export the folder with them", file=sys.stderr)
        return 2
    if a.genai and not (Path(a.genai) / "genai_config.json").is_file():
        print(f"error: --genai {a.genai} has no genai_config.json (an onnxruntime-genai model folder)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in threads:
            jobs = [(f"ours P={P}", OURS, [a.ours, str(P), str(t)]) for P in Ps]
            if a.genai:
                jobs.append(("onnxruntime-genai", GENAI, [a.genai, str(t)]))
            for label, code, head in jobs:
                work = Path(tempfile.mkdtemp(dir=tmp))
                args = head + [str(work / "prof"), str(a.prompt_len), str(a.steps)] + ([str(work)] if code is GENAI else [])
                res = profile_one(code, args, work)
                rows.append({"model": label, "threads": t, **res})
                top = ", ".join(f"{op} {v['us'] / 1e3:.2f}" for op, v in list(res["ops"].items())[:a.top])
                print(f"{label}, {t} thread(s): step {res['run_us'] / 1e3:.2f} ms (profiled), kernels "
                      f"{res['kernel_us'] / 1e3:.2f} ms in {res['nodes']:.0f} nodes, outside kernels "
                      f"{res['outside_kernels_us'] / 1e3:.2f} ms; ms per op type: {top}", flush=True)
    if a.output:
        write_json(Path(a.output), {"what": __doc__.split("\n\n")[0], "machine": device_info(),
                                    "command": " ".join(sys.argv), "prompt_len": a.prompt_len,
                                    "steps": a.steps, "rows": rows})
        print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
