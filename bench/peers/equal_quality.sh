#!/usr/bin/env bash
# Speed at equal quality, one run: the peers at 1 and 2 threads (5 interleaved rounds each), their
# quality against our fp32 export, and the merged table (bench/peers/equal_quality.py).
# Needs the peers' venv (bench/peers/README.md). Run it on a quiet machine:
#   bash bench/peers/equal_quality.sh            # ROUNDS=5 THREADS="1 2" PY=.venv-peers/bin/python
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv-peers/bin/python}
ROUNDS=${ROUNDS:-5}
THREADS=${THREADS:-"1 2"}
OUT=${OUT:-bench/results}
PEERS=llama.cpp,ort-genai-int4,ort-genai-int8,ours-fp32,ours-int4
speed=()
for t in $THREADS; do
    "$PY" bench/peers/run.py --threads "$t" --rounds "$ROUNDS" --peers "$PEERS" -o "$OUT/peers_equal_quality_t$t.json"
    speed+=("$OUT/peers_equal_quality_t$t.json")
done
"$PY" bench/peers/quality.py -o "$OUT/peers_quality_smollm2.json"
"$PY" bench/peers/equal_quality.py --speed "${speed[@]}" --quality "$OUT/peers_quality_smollm2.json" \
    -o "$OUT/peers_equal_quality.json"
