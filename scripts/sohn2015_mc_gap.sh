#!/usr/bin/env bash
# The Monte Carlo gap of one trained cell, measured: MC (z from the prior p(z|x)) and IS (z from q(z|x,y))
# estimates of the test NCLL at S = 100, 1,000 and 10,000 samples per digit, on the first EXAMPLES test
# digits (default 1,000: S = 10,000 over all 10,000 digits would take hours on a CPU), and S = 1,000 over
# the whole test split beside the table's S = 100.
#   scripts/sohn2015_mc_gap.sh <cell run dir, e.g. <sweep dir>/cvae_n1_s0> <out.csv>
# Each evaluation is a cvae-eval job with eval.tag (eval_test_<tag>.json in the run dir, skipped when present;
# its log under <run dir>/eval_logs/);
# the samples are nested: with eval.chunk=100 the first 100 of S = 1,000 are those of S = 100, and so on.
# Environment: EXAMPLES (the subset, default 1000), SAMPLES (the S on the subset, default "100 1000 10000"),
# FULL (the S on the whole split, default "100 1000"), BIN (the console scripts, default .venv/bin).
set -euo pipefail
run=$(cd "$1" && pwd); out=$2
bin=${BIN:-.venv/bin}
examples=${EXAMPLES:-1000}
evals=()
# group <examples (0: all)> <S ...>: one cvae-eval process for the S not yet evaluated on that subset (a
# Hydra multirun over eval.samples, the tag interpolated per job), then the group's files in order.
group() {
  local n=$1 samples todo=() where
  shift
  where=$([ "$n" = 0 ] && echo all || echo "first$n")
  for samples in "$@"; do
    [ -f "$run/eval_test_S${samples}_$where.json" ] || todo+=("$samples")
    evals+=("$run/eval_test_S${samples}_$where.json")
  done
  if [ ${#todo[@]} -gt 0 ]; then
    local list
    list=$(IFS=,; echo "${todo[*]}")
    echo "[mc_gap $(date +%T)] S=$list, examples=${n/#0/all}" >&2
    "$bin/cvae-eval" -m "run_dir=$run" eval.split=test "eval.samples=$list" "eval.examples=$n" \
      "eval.tag=S\${eval.samples}_$where" eval.chunk=100 "hydra.sweep.dir=$run/eval_logs/mc_gap_$where" \
      | grep '^{' >/dev/null
  fi
}
# shellcheck disable=SC2086  # the lists of S are meant to split into words
group "$examples" ${SAMPLES:-100 1000 10000}
# shellcheck disable=SC2086
group 0 ${FULL:-100 1000}
"$bin/python" - "$out" "${evals[@]}" <<'PY'
import csv, json, sys
columns = ["samples", "examples", "ncll_mc", "ncll_mc_sem", "ncll_is", "ncll_is_sem", "neg_elbo", "checkpoint_step", "seconds"]
with open(sys.argv[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    for path in sys.argv[2:]:
        e = json.load(open(path))
        w.writerow([round(e[c], 4) if isinstance(e[c], float) else e[c] for c in columns])
PY
cat "$out"
