#!/usr/bin/env bash
# The shipped smollm2-135m adapters (README "Stage-2 training"): exactly the commands that made them.
#   bench/train_smollm2.sh 2            # P=2, 130 steps x 512 tokens (~18 min on 1 CPU thread)
#   bench/train_smollm2.sh 4            # P=4, 70 steps x 512 tokens
#   bench/train_smollm2.sh 2 --resume   # continue a killed run from its last checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
P=${1:?usage: bench/train_smollm2.sh P [extra parscale train flags]}; shift
case $P in 2) STEPS=130 EVAL=26 ;; 4) STEPS=70 EVAL=35 ;; *) echo "P must be 2 or 4" >&2; exit 2 ;; esac
export OMP_NUM_THREADS=1
exec parscale --threads 1 train smollm2-135m --parallel "$P" --data stdlib -o "out/train-smollm2-p$P" \
  --steps "$STEPS" --seq-len 512 --batch 1 --grad-accum 1 --lr 5e-3 --warmup 10 \
  --eval-every "$EVAL" --eval-positions 2048 --checkpoint-every 10 "$@"
