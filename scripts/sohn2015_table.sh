#!/usr/bin/env bash
# Sohn et al. (2015) Table 1 on MNIST, cell by cell: NN baseline, CVAE, GSNN and hybrid x 1, 2, 3 quadrants
# given x seeds, each trained until early stopping ends it, evaluated on val and test by importance
# sampling, then the report.
#   scripts/sohn2015_table.sh <sweep dir> [overrides for every run, e.g. data.path=... data.binarize=...]
# A cell is one run directory, <sweep dir>/<kind>_n<n>_s<seed>:
#   1. the baselines, model=baseline;
#   2. cvae, gsnn and hybrid, each with model.baseline_run=<sweep dir>/baseline_n<n>_s<seed>, the paper's
#      training aid (the baseline's prediction y_hat feeds the prior network; model.baseline_into and
#      model.baseline_frozen say how);
#   then cvae-eval on val and test (one process, both splits: <cell>/eval_val.json, eval_test.json; its
#   logs in <sweep dir>/eval_logs/<cell>).
# Resumable: a cell with both eval files is done and skipped; a trained cell without them is only
# evaluated; a killed one continues from its newest checkpoint (resume=auto). Run the same command again
# to go on where it stopped. Cells run kind by kind in the order of MODELS (all baselines first).
# Environment: MODELS (default baseline,cvae,gsnn,hybrid; baseline cells are trained first whenever an aided
# kind needs them), N_GIVEN (default 1,2,3), SEEDS (default 0,1,2), SAMPLES (importance samples S, default
# 100), BIN (where the console scripts are, default .venv/bin), AID=0 (no training aid), JOBS=<n> (n cells
# at a time in parallel processes, e.g. sharing one GPU), REPORT=0 (no report at the end).
set -euo pipefail
mkdir -p "$1" && dir=$(cd "$1" && pwd)  # absolute: aided cells record the baseline's path
# The pipeline's command line, for the report (shell-quoted only where a word needs it).
quote() { if [[ $1 =~ ^[A-Za-z0-9_.,/=:+@%-]*$ ]]; then printf '%s' "$1"; else printf '%q' "$1"; fi; }
{
  for var in AID MODELS N_GIVEN SEEDS SAMPLES JOBS; do
    if [ -n "${!var:-}" ]; then printf '%s=%s ' "$var" "$(quote "${!var}")"; fi
  done
  printf 'scripts/sohn2015_table.sh'
  for word in "$@"; do printf ' %s' "$(quote "$word")"; done
  printf '\n'
} > "$dir/command.txt"
shift
bin=${BIN:-.venv/bin}
IFS=, read -r -a kinds <<< "${MODELS:-baseline,cvae,gsnn,hybrid}"
IFS=, read -r -a columns <<< "${N_GIVEN:-1,2,3}"
IFS=, read -r -a seeds <<< "${SEEDS:-0,1,2}"
jobs=${JOBS:-1}
[ "$jobs" -gt 1 ] && export XLA_PYTHON_CLIENT_PREALLOCATE=false  # no process may take most of the accelerator

log() { echo "[sohn2015_table $(date +%T)] $*" >&2; }

# cell <kind> <n> <seed>: train (or continue) and evaluate one cell, unless it is done.
cell() {
  local kind=$1 n=$2 seed=$3 name="$1_n$2_s$3" run="$dir/$1_n$2_s$3"
  shift 3
  if [ -f "$run/eval_val.json" ] && [ -f "$run/eval_test.json" ]; then
    log "$name: done"
    return 0
  fi
  local aid=()
  if [ "$kind" != baseline ] && [ "${AID:-1}" != 0 ]; then aid=("model.baseline_run=$dir/baseline_n${n}_s${seed}"); fi
  if [ ! -f "$run/metrics.json" ]; then
    log "$name: training"
    "$bin/cvae-train" experiment=sohn2015 "model=$kind" "data.n_given=$n" "seed=$seed" "${aid[@]}" \
      hydra.run.dir="$run" resume=auto trainer.progress=false "$@" >/dev/null
  fi
  log "$name: evaluating"
  "$bin/cvae-eval" -m "run_dir=$run" eval.split=val,test eval.samples="${SAMPLES:-100}" \
    hydra.sweep.dir="$dir/eval_logs/$name" | grep '^{' >/dev/null
  log "$name: done (val ncll $(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["ncll"], 2))' "$run/eval_val.json"))"
}

# Runs the cells of one kind, `jobs` at a time; fails when any of them fails.
kind_cells() {
  local kind=$1 pids=() n seed
  shift
  for seed in "${seeds[@]}"; do
    for n in "${columns[@]}"; do
      if [ "$jobs" -gt 1 ]; then
        while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
        cell "$kind" "$n" "$seed" "$@" &
        pids+=($!)
      else
        cell "$kind" "$n" "$seed" "$@"
      fi
    done
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

needs_baseline=0
for kind in "${kinds[@]}"; do [ "$kind" != baseline ] && needs_baseline=1; done
if [[ " ${kinds[*]} " == *" baseline "* ]] || { [ "$needs_baseline" = 1 ] && [ "${AID:-1}" != 0 ]; }; then
  kind_cells baseline "$@"
fi
for kind in "${kinds[@]}"; do
  if [ "$kind" != baseline ]; then kind_cells "$kind" "$@"; fi
done
if [ "${REPORT:-1}" != 0 ] && [ -x "$bin/cvae-report" ]; then "$bin/cvae-report" "$dir" --paper sohn2015; fi
