#!/usr/bin/env bash
# Does ParScale help, or is it prefix tuning? (README, issue 17) The whole controlled stage-2
# experiment on smollm2-135m (frozen backbone), one command, re-runnable:
#
#   nohup nice -n 5 bench/prefix_vs_parscale.sh > runs/prefix_vs_parscale/queue.log 2>&1 &
#
# Arms: P=1 prefix (the prefix-tuning control: one stream, its own 48-slot KV prefix per layer, no
# aggregator; `parscale train --parallel 1 --prefix`), P=2, P=4. Same backbone, same data split
# (--data stdlib), same schedule shape (AdamW, warmup then cosine to 10%), same tokens per run.
#
# 1. LR sweep: every arm at each of $SWEEP_LRS for $SWEEP_TOKENS tokens (warmup 1 step), scored on
#    a *validation* text: hash-held-out stdlib modules that are neither trained on nor part of the
#    reported table (so the LR is not picked on the test text). Each arm's LR = lowest final
#    validation NLL; when that is the largest value of the grid, one more run at twice it is added
#    (once) before picking. Written once to runs/prefix_vs_parscale/lr_<arm>.txt (delete to re-pick).
#    An arm is swept just before its first full run (so P=4's sweep comes after the P=1/P=2 runs).
# 2. Full runs, $FULL_TOKENS tokens each (196 steps x 512), in this order: P=1 prefix seed 0,
#    P=2 seed 0, P=1 prefix seed 1, P=2 seed 1, P=4 seed 0 (then P=4 seed 1 when FOUR_SEEDS=2).
#    A finished run (adapter.safetensors + history.json with tokens_trained) is skipped; a killed
#    one continues with --resume from its last checkpoint (every 10 steps).
# 3. After every full run: bench/adapter_eval.py over all finished adapters on both held-out texts
#    (cached per adapter, so only new ones cost time) -> runs/prefix_vs_parscale/eval.json.
#
# Re-run the same command to continue after a kill or a new session. Everything goes under the
# git-ignored runs/prefix_vs_parscale/.
#
# Time (measured in the sweep, 2-core VM shared with other jobs at load 4-5.6, 1 torch thread):
# P=1 prefix 56-76 tokens/s, P=2 20-39 tokens/s, P=4 about half of P=2. A 100k-token run is
# therefore ~25-30 min at P=1, ~45-80 min at P=2, ~1.5-2.5 h at P=4 (plus 2-6 min of evaluation
# each); the sweep took 2-3 min per P=1 run, 4-7 min per P=2 run. Whole queue: about 6-8 hours on
# this machine; per-run speeds are in each history.json (train_seconds, sessions).
set -euo pipefail
cd "$(dirname "$0")/.."

main() {
  local ROOT=runs/prefix_vs_parscale
  local SWEEP_LRS=${SWEEP_LRS:-"2.5e-3 5e-3 1e-2"}
  local SWEEP_TOKENS=${SWEEP_TOKENS:-6144}
  local FULL_TOKENS=${FULL_TOKENS:-100352}
  local FOUR_SEEDS=${FOUR_SEEDS:-1}
  local STDLIB
  STDLIB=$(python -c "from parscale_edge.corpus import stdlib_root; print(stdlib_root())")
  # validation text of the sweep: hash-held-out modules (edge/corpus.py), not in the reported table
  local VALID=("$STDLIB/traceback.py" "$STDLIB/sched.py" "$STDLIB/multiprocessing/connection.py")
  export OMP_NUM_THREADS=1
  # the installed parscale_edge runs (pip install -e . in this checkout: its edge/ is parscale_edge)
  mkdir -p "$ROOT/sweep" "$ROOT/full"

  arm_flags() {  # arm name -> parscale train flags
    case $1 in
      p1prefix) echo "--parallel 1 --prefix" ;;
      p2) echo "--parallel 2" ;;
      p4) echo "--parallel 4" ;;
    esac
  }

  finished() {  # run folder -> 0 when the run completed
    [[ -f $1/adapter.safetensors && -f $1/history.json ]] &&
      python -c "import json,sys; sys.exit(0 if 'tokens_trained' in json.load(open('$1/history.json')) else 1)"
  }

  run_train() {  # out flags...
    local out=$1; shift
    if finished "$out"; then echo "== done already: $out"; return 0; fi
    local resume=()
    [[ -f $out/checkpoint.safetensors ]] && resume=(--resume)
    echo "== $(date -u +%FT%TZ) train $out $* ${resume[*]}"
    parscale --threads 1 train smollm2-135m --data stdlib -o "$out" --quiet --seq-len 512 --batch 1 \
      --grad-accum 1 --min-lr-ratio 0.1 --checkpoint-every 10 "$@" "${resume[@]}"
  }

  pick() {  # root arm lr... [--write] -> prints the lr with the lowest final validation NLL
    python - "$@" <<'EOF'
import json, sys
write = sys.argv[-1] == "--write"
root, arm, lrs = sys.argv[1], sys.argv[2], [x for x in sys.argv[3:] if x != "--write"]
rows = []
for lr in lrs:
    h = json.load(open(f"{root}/sweep/{arm}-lr{lr}/history.json"))
    rows.append((h["evals"][-1]["nll"], lr, h["evals"][0]["nll"], h["dense"]["nll"],
                 h["tokens_trained"] / h["train_seconds"]))
best = min(rows)[1]
if write:
    for nll, lr, nll0, dense, tps in rows:
        print(f"   sweep {arm} lr {lr}: validation nll {nll:.4f} (untrained {nll0:.4f}, dense {dense:.4f}), "
              f"{tps:.0f} tokens/s")
    open(f"{root}/lr_{arm}.txt", "w").write(best + "\n")
    print(f"== {arm}: lr {best} picked")
else:
    print(best)
EOF
  }

  # ---------------------------------------------------------------- 1. learning-rate sweep
  ensure_lr() {  # arm: sweep it unless its lr is picked already
    local arm=$1 lr
    [[ -f $ROOT/lr_$arm.txt ]] && return 0
    for lr in $SWEEP_LRS; do
      # shellcheck disable=SC2046
      run_train "$ROOT/sweep/$arm-lr$lr" $(arm_flags $arm) --tokens "$SWEEP_TOKENS" --lr "$lr" --warmup 1 \
        --seed 0 --eval "${VALID[@]}" --eval-every 1000 --eval-positions 1024
    done
    local lrs=$SWEEP_LRS top=${SWEEP_LRS##* }
    # the best at the top of the grid: one more value, twice the largest (the optimum may lie above)
    if [[ $(pick "$ROOT" "$arm" $lrs) == "$top" ]]; then
      local up
      up=$(python -c "import sys; print(f'{2 * float(sys.argv[1]):g}')" "$top")
      # shellcheck disable=SC2046
      run_train "$ROOT/sweep/$arm-lr$up" $(arm_flags $arm) --tokens "$SWEEP_TOKENS" --lr "$up" --warmup 1 \
        --seed 0 --eval "${VALID[@]}" --eval-every 1000 --eval-positions 1024
      lrs="$lrs $up"
    fi
    pick "$ROOT" "$arm" $lrs --write
  }

  # ---------------------------------------------------------------- 2. full runs (+ 3. evaluation)
  local arm seed
  local order=("p1prefix 0" "p2 0" "p1prefix 1" "p2 1" "p4 0")
  [[ $FOUR_SEEDS == 2 ]] && order+=("p4 1")
  local item
  for item in "${order[@]}"; do
    read -r arm seed <<<"$item"
    ensure_lr "$arm"  # an arm's sweep runs before its first full run (P=4's after the P=1/P=2 runs)
    # shellcheck disable=SC2046
    run_train "$ROOT/full/$arm-s$seed" $(arm_flags $arm) --tokens "$FULL_TOKENS" --lr "$(cat "$ROOT/lr_$arm.txt")" \
      --warmup 10 --seed "$seed" --eval-every 49 --eval-positions 2048
    echo "== $(date -u +%FT%TZ) evaluating the finished adapters"
    python bench/adapter_eval.py smollm2-135m "$ROOT"/full/*/adapter.safetensors --compare \
      --cache "$ROOT/eval_cache" --json "$ROOT/eval.json" || echo "== evaluation failed (the runs are kept)"
  done
  echo "== $(date -u +%FT%TZ) queue finished"
}

main "$@"; exit  # one line: bash has read it whole before main runs, so editing this file is safe
