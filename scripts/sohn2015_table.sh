#!/usr/bin/env bash
# Sohn et al. (2015) Table 1 on MNIST: trains the 12 models (baseline, CVAE, GSNN, hybrid x 1, 2, 3
# quadrants given), evaluates each on val and test by importance sampling, and writes the report.
#   scripts/sohn2015_table.sh <sweep dir> [overrides for every run, e.g. data.path=... trainer.max_steps=...]
# Environment: SAMPLES (importance samples S, default 100), BIN (where the console scripts are).
set -euo pipefail
dir=$1; shift
bin=${BIN:-.venv/bin}
"$bin/cvae-train" -m experiment=sohn2015 hydra.sweep.dir="$dir" trainer.progress=false "$@"
for run in "$dir"/*/; do
  [ -f "$run/metrics.json" ] || continue
  for split in val test; do
    "$bin/cvae-eval" run_dir="$run" eval.samples="${SAMPLES:-100}" eval.split="$split" | tail -n 1
  done
done
if [ -x "$bin/cvae-report" ]; then "$bin/cvae-report" "$dir" --paper sohn2015; fi
