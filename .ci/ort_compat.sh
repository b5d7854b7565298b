#!/usr/bin/env bash
# The fused-graph tests under the oldest onnxruntime the default export supports (1.31.1, the newest
# onnxruntime-gpu release as of 2026-12: its operator set is what GPU users get), in a second venv
# built here. A graph change that needs a newer onnxruntime fails this. Usage: bash .ci/ort_compat.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ORT=${PARSCALE_COMPAT_ORT:-1.31.1}
VENV=.venv-ort-${ORT}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -e ".[export,quant]" "onnxruntime==${ORT}" "pytest>=8" "hypothesis>=6.100"
PARSCALE_EXPECT_ORT="$ORT" "$VENV/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider \
  tests/test_fused.py tests/test_fused_half.py tests/test_quant.py tests/test_runtime.py tests/test_kv_cache_int8.py \
  tests/robustness/test_01_left_padding.py tests/robustness/test_12_generation_input.py
