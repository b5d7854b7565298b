"""Does a smaller KV cache make a decode step faster on this CPU? (issue 18, item 2)

ONNX Runtime's GroupQueryAttention takes its cache as float32, float16 (beside a float32 query) or
int8 with static scales (``k_quant_type``/``v_quant_type`` PER_TENSOR or PER_CHANNEL,
``kv_cache_bit_width=8``, scales as inputs 12/13). This times one decode step of a stack of
GroupQueryAttention nodes alone (no weights: the attention part of a step, which is what grows
with the context) for each cache type, in interleaved rounds, at the shapes of smollm2-135m
(30 layers, 9 query heads, 3 KV heads, head_dim 64) and rows = P*B:

    python bench/kv_cache_dtypes.py --rows 1,4 --context 2048 --threads 1,2 --rounds 5 \
        -o bench/results/kv_cache_dtypes.json

Units: ms per step (median over the steps of a round; the table gives the median over rounds of
each type's ratio to float32 within the same round), MiB of cache. Values are random: time does
not depend on them (scales are fixed). Exit 2 with one line when the installed onnxruntime
cannot run a type (that type's row says why; the others still run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64
TYPES = ("float32", "float16", "int8-per-tensor", "int8-per-channel")


def build(cache: str, layers: int, rows: int, capacity: int) -> bytes:
    """A graph of ``layers`` GroupQueryAttention nodes chained through their outputs (decode, S=1).

    Inputs: ``qkv`` float32 [rows, 1, (heads+2*kv)*head_dim], ``seqlens_k`` int32 [rows],
    ``total`` int32 [], ``cos``/``sin`` float32 [capacity, head_dim/2], per layer ``pk{i}``/``pv{i}``
    [rows, kv, capacity, head_dim] of the cache type (bound in place, present = past), and for int8
    ``ks``/``vs`` float32 ([1] per tensor, [kv, 1, head_dim] per channel)."""
    from onnx import TensorProto as TP
    from onnx import helper

    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    elem = {"float32": TP.FLOAT, "float16": TP.FLOAT16}.get(cache, TP.INT8)
    vi = helper.make_tensor_value_info
    inputs = [vi("qkv", TP.FLOAT, [rows, 1, width]), vi("seqlens_k", TP.INT32, [rows]), vi("total", TP.INT32, []),
              vi("cos", TP.FLOAT, [capacity, HEAD_DIM // 2]), vi("sin", TP.FLOAT, [capacity, HEAD_DIM // 2])]
    quant = cache.startswith("int8")
    if quant:
        shape = [KV_HEADS, 1, HEAD_DIM] if cache.endswith("channel") else [1]
        inputs += [vi("ks", TP.FLOAT, shape), vi("vs", TP.FLOAT, shape)]
    nodes, outputs, x = [], [], "qkv"
    for i in range(layers):
        inputs += [vi(f"pk{i}", elem, [rows, KV_HEADS, capacity, HEAD_DIM]),
                   vi(f"pv{i}", elem, [rows, KV_HEADS, capacity, HEAD_DIM])]
        ins = [x, "", "", f"pk{i}", f"pv{i}", "seqlens_k", "total", "cos", "sin"]
        attrs = dict(num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1)
        if quant:
            q = "PER_CHANNEL" if cache.endswith("channel") else "PER_TENSOR"
            ins += ["", "", "", "ks", "vs"]
            attrs.update(k_quant_type=q, v_quant_type=q, kv_cache_bit_width=8)
        nodes.append(helper.make_node("GroupQueryAttention", ins, [f"a{i}", f"ok{i}", f"ov{i}"],
                                      domain="com.microsoft", **attrs))
        # the next layer's packed qkv from this output (attention output [rows,1,heads*hd] -> width)
        nodes.append(helper.make_node("Concat", [f"a{i}"] * 3, [f"c{i}"], axis=-1))
        nodes.append(helper.make_node("Slice", [f"c{i}", "start", "end", "axis"], [f"x{i}"]))
        x = f"x{i}"
        outputs += [vi(f"ok{i}", elem, None), vi(f"ov{i}", elem, None)]
    init = [helper.make_tensor("start", TP.INT64, [1], [0]), helper.make_tensor("end", TP.INT64, [1], [width]),
            helper.make_tensor("axis", TP.INT64, [1], [2])]
    graph = helper.make_graph(nodes, "gqa_stack", inputs, [vi(x, TP.FLOAT, None), *outputs], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    return model.SerializeToString()


class Stack:
    """A session of :func:`build` with its cache bound in place, filled up to ``context`` tokens."""

    def __init__(self, cache: str, layers: int, rows: int, context: int, threads: int):
        import onnxruntime as ort

        capacity = context + 64
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(build(cache, layers, rows, capacity), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
        angle = np.arange(capacity)[:, None] / (10000.0 ** (np.arange(HEAD_DIM // 2) / (HEAD_DIM // 2)))
        self.bind = self.session.io_binding()
        feeds = {"qkv": rng.standard_normal((rows, 1, width), dtype=np.float32),
                 "seqlens_k": np.full(rows, context, np.int32), "total": np.array(capacity, np.int32),
                 "cos": np.cos(angle).astype(np.float32), "sin": np.sin(angle).astype(np.float32)}
        if cache.startswith("int8"):
            shape = (KV_HEADS, 1, HEAD_DIM) if cache.endswith("channel") else (1,)
            feeds["ks"] = feeds["vs"] = np.full(shape, 0.02, np.float32)
        self.keep = list(feeds.values())
        for k, v in feeds.items():
            self.bind.bind_cpu_input(k, v)
        self.cache_bytes = 0
        for i in range(layers):
            for kv in "kv":
                c = (rng.integers(-100, 100, (rows, KV_HEADS, capacity, HEAD_DIM), dtype=np.int8) if cache.startswith("int8")
                     else rng.standard_normal((rows, KV_HEADS, capacity, HEAD_DIM)).astype(cache))
                ov = ort.OrtValue.ortvalue_from_numpy(c)
                self.keep.append(ov)
                self.cache_bytes += c.nbytes
                self.bind.bind_ortvalue_input(f"p{kv}{i}", ov)
                self.bind.bind_ortvalue_output(f"o{kv}{i}", ov)
        self.bind.bind_output(self.session.get_outputs()[0].name)

    def step_ms(self, steps: int) -> float:
        """Median ms of ``steps`` decode steps (after 3 untimed)."""
        times = []
        for i in range(steps + 3):
            t = time.perf_counter()
            self.session.run_with_iobinding(self.bind)
            if i >= 3:
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4", help="P*B values, comma-separated")
    ap.add_argument("--context", type=int, default=2048, help="tokens already in the cache")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args()
    import onnxruntime as ort

    from parscale_edge.atomic import write_json
    from parscale_edge.device import device_info

    rows_list = [int(x) for x in a.rows.split(",")]
    threads_list = [int(x) for x in a.threads.split(",")]
    result = {"machine": device_info(), "onnxruntime": ort.__version__, "context": a.context, "layers": a.layers,
              "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "rounds": a.rounds, "steps": a.steps,
              "command": " ".join(sys.argv), "rows": []}
    print(f"onnxruntime {ort.__version__}, {a.layers} GQA layers, context {a.context}, {a.rounds} interleaved rounds")
    print("| threads | rows | cache | MiB | step ms (median) | vs float32 (median of per-round ratios) |\n|---|---|---|---|---|---|")
    failed = False
    for threads in threads_list:
        for rows in rows_list:
            stacks, errors = {}, {}
            for t in TYPES:
                try:
                    stacks[t] = Stack(t, a.layers, rows, a.context, threads)
                except Exception as e:  # noqa: BLE001 - a type this onnxruntime cannot run is a result
                    errors[t] = str(e).splitlines()[0][:300]
            times: dict[str, list[float]] = {t: [] for t in stacks}
            for r in range(a.rounds):
                order = list(stacks)[r % len(stacks):] + list(stacks)[: r % len(stacks)]
                for t in order:
                    times[t].append(stacks[t].step_ms(a.steps))
            for t in TYPES:
                if t in errors:
                    failed = True
                    row = {"threads": threads, "rows": rows, "cache": t, "error": errors[t]}
                    print(f"| {threads} | {rows} | {t} | | fails: {errors[t][:80]} | |")
                else:
                    ratios = [x / f for x, f in zip(times[t], times.get("float32", times[t]))]
                    row = {"threads": threads, "rows": rows, "cache": t, "cache_mib": stacks[t].cache_bytes / 2**20,
                           "step_ms_rounds": times[t], "step_ms": statistics.median(times[t]),
                           "ratio_to_float32": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}
                    print(f"| {threads} | {rows} | {t} | {row['cache_mib']:.0f} | {row['step_ms']:.2f} | "
                          f"{row['ratio_to_float32']:.2f} ({min(ratios):.2f}..{max(ratios):.2f}) |")
                result["rows"].append(row)
            stacks.clear()
    if a.output:
        write_json(Path(a.output), result)
        print(f"wrote {a.output}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
