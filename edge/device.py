"""What machine this is: CPU, memory, ONNX Runtime providers and a measured memory bandwidth.

``parscale device-info`` prints it; the profiler stores it beside every result so numbers from
different machines are never mixed up. The bandwidth measurement is cached (it takes seconds) for
one boot of one CPU model: cloud VMs that report the same CPU model string are not the same machine
(sessions here land on different "AMD EPYC" VMs), so a new boot measures again. The cached record
keeps the 1-minute load average of its measurement: the same VM read 10.8 GB/s while other jobs ran
and 33.2 GB/s quiet; ``parscale device-info --refresh`` measures again.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def cpu_description() -> dict:
    """CPU model, logical cores, SIMD flags of interest (Linux /proc/cpuinfo; best effort elsewhere)."""
    info = {"model": platform.processor() or platform.machine(), "logical_cores": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["model"] in ("", platform.machine(), platform.processor()):
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            wanted = ["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
                      "avx512_bf16", "neon", "asimd", "sve"]
            info["flags"] = [f for f in wanted if f in flags]
            break
    return info


def memory_gib() -> float | None:
    """Physical memory, GiB."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def gpu_description() -> list[dict] | None:
    """NVIDIA GPUs from ``nvidia-smi`` (name, memory MiB, driver, compute capability); None when
    there is no nvidia-smi or it fails."""
    import subprocess

    fields = ["name", "memory.total", "driver_version", "compute_cap"]
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or not r.stdout.strip():
        return None
    gpus = []
    for line in r.stdout.strip().splitlines():
        vals = [v.strip() for v in line.split(",")]
        if len(vals) == len(fields):
            g = dict(zip(("name", "memory_mib", "driver", "compute_capability"), vals))
            try:
                g["memory_mib"] = float(g["memory_mib"])
            except ValueError:
                pass
            gpus.append(g)
    return gpus or None


def measure_bandwidth(size_mib: int = 256, repeat: int = 5, threads: int = 1) -> dict:
    """Memory bandwidth reached by ``threads`` threads, GB/s (1e9 bytes/s), best of ``repeat``.

    ``read``: the faster of two full reductions (``max``, ``sum``) over a float32 array of
    ``size_mib`` MiB (bytes read / time): the relevant number for decode, which streams the
    weights once per token. ``copy``: ``np.copyto`` (bytes read + written / time). With several
    threads each reduces or copies its own contiguous slice at the same time (numpy releases the
    GIL in both), as ONNX Runtime's intra-op threads split a MatMul. On a shared machine other
    processes lower both: the best of several runs is reported. Raises ValueError for threads < 1."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    from concurrent.futures import ThreadPoolExecutor

    n = size_mib * 2**20 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    a.sum()
    cuts = np.linspace(0, n, threads + 1).astype(int)
    parts = [(a[lo:hi], b[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:])]
    best_read = best_copy = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        def timed(fn) -> float:
            t0 = time.perf_counter()
            list(pool.map(fn, parts))
            return time.perf_counter() - t0

        for _ in range(repeat):
            for reduce in (np.max, np.sum):
                best_read = min(best_read, timed(lambda ab: reduce(ab[0])))
            best_copy = min(best_copy, timed(lambda ab: np.copyto(ab[1], ab[0])))
    return {"read_gbps": round(a.nbytes / best_read / 1e9, 2), "copy_gbps": round(2 * a.nbytes / best_copy / 1e9, 2),
            "array_mib": size_mib, "threads": threads}


def boot_id() -> str | None:
    """This boot's identity (Linux ``/proc/sys/kernel/random/boot_id``), None where there is none.
    A cached measurement from another boot may be from another machine."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def read_bandwidth_gbps(threads: int, cache_dir: str | os.PathLike | None = None) -> float:
    """Read bandwidth of ``threads`` threads (:func:`measure_bandwidth`), GB/s: the reference the
    profiler divides a run's decode traffic by, so a run and its reference use the same threads.
    Cached per thread count in ``<cache>/bandwidth.json`` (re-measured when the CPU model, the core
    count or the boot (:func:`boot_id`) changed). Raises ValueError for threads < 1."""
    from .hub import default_cache_dir

    cpu = cpu_description()
    key = f"{cpu['model']}|{cpu['logical_cores']}|{threads}"
    path = Path(cache_dir or default_cache_dir()) / "bandwidth.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cached = {}
    boot = boot_id()
    if not isinstance(cached, dict) or not isinstance(cached.get(key), dict) or "read_gbps" not in cached[key] \
            or cached[key].get("boot_id") != boot:
        cached = cached if isinstance(cached, dict) else {}
        cached[key] = {**measure_bandwidth(threads=threads), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "boot_id": boot}
        from .atomic import write_json

        write_json(path, cached)
    return float(cached[key]["read_gbps"])


def device_info(cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> dict:
    """Machine description with a measured bandwidth, cached in ``<cache>/device-info.json``
    (re-measured when the CPU model, the core count or the boot (:func:`boot_id`) changed, or with
    ``refresh``)."""
    import onnxruntime as ort

    from .hub import default_cache_dir

    cpu = cpu_description()
    info = {"cpu": cpu, "memory_gib": memory_gib(), "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(), "gpu": gpu_description()}
    path = Path(cache_dir or default_cache_dir()) / "device-info.json"
    cached = None
    if path.exists() and not refresh:
        try:
            cached = json.loads(path.read_text())
        except json.JSONDecodeError:
            cached = None
    boot = boot_id()
    if cached and cached.get("cpu", {}).get("model") == cpu["model"] and \
            cached.get("cpu", {}).get("logical_cores") == cpu["logical_cores"] and "bandwidth" in cached \
            and cached["bandwidth"].get("boot_id") == boot:
        info["bandwidth"] = cached["bandwidth"]
    else:
        info["bandwidth"] = measure_bandwidth()
        info["bandwidth"].update(measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), boot_id=boot,
                                 loadavg_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        from .atomic import write_json

        write_json(path, info)
        # a new measurement (refresh, another CPU) makes the per-thread references of
        # read_bandwidth_gbps stale too: they are measured again when next asked for
        path.with_name("bandwidth.json").unlink(missing_ok=True)
    info["loadavg"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info
