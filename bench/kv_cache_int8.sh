#!/usr/bin/env bash
# int8 KV cache quality on smollm2-135m (issue 18, item 2): the int8-cache folder against the float one
# at 2048 tokens of context, P=1 and P=2 (one backbone), then the summary JSON with memory numbers.
# Writes bench/results/kv_cache_int8/. About 15 minutes on 2 shared cores.
#   bash bench/kv_cache_int8.sh [WORK_DIR]   (default /tmp/kvq)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/kvq}
R=bench/results/kv_cache_int8
mkdir -p "$R" "$W"
[ -f "$W/fp32/manifest.json" ] || parscale -q export smollm2-135m -P 1,2 -o "$W/fp32"
parscale quantize "$W/fp32" --kv-cache int8 -o "$W/kv8" --compare-positions 0 --overwrite
parscale compare "$W/fp32" "$W/kv8" --window 2048 --max-positions 4096 --threads 2 --json "$R/compare_p1.json"
parscale compare "$W/fp32" "$W/kv8" --reference-parallel 2 --candidate-parallel 2 --window 2048 \
  --max-positions 4096 --threads 2 --json "$R/compare_p2.json"
# calibrated on another text than the one measured (argparse.py, not a held-out module)
python -c "import argparse, shutil, sys; shutil.copy(argparse.__file__, sys.argv[1])" "$W/calib_argparse.py"
parscale quantize "$W/fp32" --kv-cache int8 --calibration "$W/calib_argparse.py" -o "$W/kv8c" --compare-positions 0 --overwrite
parscale compare "$W/fp32" "$W/kv8c" --window 2048 --max-positions 4096 --threads 2 --json "$R/compare_p1_calib_argparse.json"
python bench/kv_cache_int8_summary.py "$W" "$R"
