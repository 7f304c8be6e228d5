#!/usr/bin/env bash
# Sohn et al. (2015) Table 1 on MNIST: trains the 12 models (baseline, CVAE, GSNN, hybrid x 1, 2, 3
# quadrants given), evaluates each on val and test by importance sampling, and writes the report.
#   scripts/sohn2015_table.sh <sweep dir> [overrides for every run, e.g. data.path=... trainer.max_steps=...]
# Two stages, as in the paper (its training aid: the CVAE is built on the pre-trained baseline):
#   1. the three baselines, into <sweep dir>/baseline_n1, baseline_n2, baseline_n3;
#   2. cvae, gsnn and hybrid x n_given, into <sweep dir>/<kind>_n<n>, each with
#      model.baseline_run=<sweep dir>/baseline_n<n>: the baseline's prediction feeds the prior and
#      generation networks, starting from that run's best checkpoint and fine-tuned with the rest.
# Then one cvae-eval multirun over every job and both splits (one process: JAX starts once), writing
# <job>/eval_val.json and eval_test.json (its logs go to <sweep dir>/eval_logs), and cvae-report.
# Environment: SAMPLES (importance samples S, default 100), BIN (where the console scripts are),
# AID=0 (one 12-job sweep without the training aid, numbered job dirs: the behaviour before the aid),
# MODELS (the aided kinds of stage 2, default cvae,gsnn,hybrid; e.g. MODELS=cvae for baseline and CVAE only),
# N_GIVEN (the quadrant counts, default 1,2,3; both stages),
# JOBS=<n> (train and evaluate n jobs at a time in parallel processes, through hydra-joblib-launcher).
set -euo pipefail
mkdir -p "$1" && dir=$(cd "$1" && pwd)  # absolute: aided jobs record the baseline's path
# The whole pipeline's command line, for the report (multirun.yaml holds only the last training sweep).
{
  for var in AID MODELS N_GIVEN SAMPLES JOBS; do
    if [ -n "${!var:-}" ]; then printf '%s=%q ' "$var" "${!var}"; fi
  done
  printf 'scripts/sohn2015_table.sh'; printf ' %q' "$@"; printf '\n'
} > "$dir/command.txt"
shift
bin=${BIN:-.venv/bin}
parallel=()
if [ -n "${JOBS:-}" ]; then  # JOBS parallel processes (hydra-joblib-launcher), e.g. sharing one GPU
  parallel=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS")
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # no process may take most of the accelerator's memory
fi
train=("$bin/cvae-train" -m experiment=sohn2015 hydra.sweep.dir="$dir" trainer.progress=false "${parallel[@]}")
if [ "${AID:-1}" = 0 ]; then
  "${train[@]}" "$@"
else
  named=('hydra.sweep.subdir=${model.kind}_n${data.n_given}')  # baseline_n1, cvae_n2, ...
  "${train[@]}" model=baseline "data.n_given=${N_GIVEN:-1,2,3}" "${named[@]}" "$@"
  # Resolved per job from its own data.n_given (the saved config keeps the interpolation, which needs
  # nothing but that config to resolve).
  "${train[@]}" "model=${MODELS:-cvae,gsnn,hybrid}" "data.n_given=${N_GIVEN:-1,2,3}" "${named[@]}" \
    "model.baseline_run=$dir/baseline_n\${data.n_given}" "$@"
fi
runs=()
for run in "$dir"/*/; do
  [ -f "$run/metrics.json" ] && runs+=("${run%/}")
done
if [ ${#runs[@]} -gt 0 ]; then
  list=$(IFS=,; echo "${runs[*]}")
  "$bin/cvae-eval" -m "run_dir=$list" eval.split=val,test eval.samples="${SAMPLES:-100}" \
    hydra.sweep.dir="$dir/eval_logs" "${parallel[@]}" | grep '^{'
fi
if [ -x "$bin/cvae-report" ]; then "$bin/cvae-report" "$dir" --paper sohn2015; fi
