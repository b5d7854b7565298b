#!/usr/bin/env bash
# GPU check of parscale-edge on a machine with one NVIDIA GPU and no internet (bench/gpu_check.py
# says what it measures). Finishes in under 8 minutes; results in bench/results/gpu_check/.
#
#   1. beforehand, on a machine with internet (any OS; wheels for linux x86_64, GPU machine's Python):
#        bench/gpu_check.sh --download --python-version 3.12 [--split-mib 55]
#      fills bench/wheels/ (git ignores it; about 270 MiB: onnxruntime-gpu and the project's
#      dependencies, not torch: the GPU machine must have PyTorch). --split-mib cuts it into
#      bench/wheels/carry-NN/ folders for a transport with a size limit.
#   2. carry the repository with bench/wheels/ (or the carry-NN folders, in any order, into one or
#      more folders named by WHEELS="dir1 dir2") to the GPU machine, then:
#        bench/gpu_check.sh                    # the check; exit status 0 = every check passed
#        bench/gpu_check.sh --real-model PATH  # also fp16 vs fp32 on a real GGUF carried along
#   On a CPU: bench/gpu_check.sh --dry-run   (same steps, tiny models, no wheels needed)
#
# Environment: PYTHON (default python3: the interpreter that has torch), WHEELS (default
# bench/wheels), SITE (overlay folder, default /tmp/parscale-gpu-site).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--download" ]]; then
    shift
    exec "$PY" bench/gpu_check.py download "$@"
fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,20p' "$0"
    exit 0
fi

dry=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry=1; done

if [[ $dry == 0 ]]; then
    if ! nvidia-smi -L >/dev/null 2>&1; then
        echo "error: nvidia-smi finds no NVIDIA GPU here; run with --dry-run on a CPU" >&2
        exit 2
    fi
    # shellcheck disable=SC2086
    site=$("$PY" bench/gpu_check.py install --wheels ${WHEELS:-bench/wheels} --target "${SITE:-/tmp/parscale-gpu-site}" | tail -n 1)
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    # CUDA/cuDNN from NVIDIA's pip wheels (nvidia-*), where the machine has them beside PyTorch
    libs=$("$PY" -c 'import glob, site; print(":".join(sorted({d for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/*/lib") + glob.glob(p + "/nvidia/*/*/lib")})))')
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the check keeps its own deadline (420 s); this is the backstop for the 8-minute limit (with the
# install step before it, about 20 s)
exec timeout --kill-after=5 450 "$PY" bench/gpu_check.py run "$@"
