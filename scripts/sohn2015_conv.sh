#!/usr/bin/env bash
# The convolutional networks on the Sohn et al. (2015) quadrant task, 1 quadrant given: the baseline and the
# CVAE of model/net=conv under the table's protocol (experiment=sohn2015: early stopping on validation, the
# frozen aid, IS with S = 100), each cell by scripts/sohn2015_table.sh. Sizes are chosen on validation: a
# small search over model.net.channels (SIZES, seed 0), then, for each kind, the size with the lower val NCLL
# trains seeds 1 and 2 (SEEDS). Resumable: run the same command again to go on where it stopped.
#   scripts/sohn2015_conv.sh <folder> [overrides for every run, e.g. data.path=... data.binarize=...]
# Cells: <folder>/<size>/<kind>_n1_s<seed> (the CVAE's aid is the baseline of its own size and seed), the
# choice in <folder>/chosen.txt. Environment: SIZES (space-separated channel lists, default "16,32 32,64"),
# SEEDS (default 1,2; empty: the search only), BIN (default .venv/bin).
set -euo pipefail
mkdir -p "$1" && dir=$(cd "$1" && pwd)
shift
read -r -a sizes <<< "${SIZES:-16,32 32,64}"
folder() { echo "$dir/c${1//,/_}"; }
log() { echo "[sohn2015_conv $(date +%T)] $*" >&2; }
cells() {  # cells <channels> <seeds> <models>
  MODELS=$3 N_GIVEN=1 SEEDS=$2 REPORT=0 scripts/sohn2015_table.sh "$(folder "$1")" model/net=conv \
    "model.net.channels=[$1]" "${@:4}"
}
for size in "${sizes[@]}"; do
  log "search: channels [$size], seed 0"
  cells "$size" 0 cvae "$@"
done
val() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ncll"])' "$1/eval_val.json"; }
: > "$dir/chosen.txt"
for kind in baseline cvae; do
  best="" best_val=""
  for size in "${sizes[@]}"; do
    v=$(val "$(folder "$size")/${kind}_n1_s0")
    echo "$kind channels=[$size] val_ncll=$v" >> "$dir/chosen.txt"
    if [ -z "$best" ] || python3 -c "import sys; sys.exit(not float(sys.argv[1]) < float(sys.argv[2]))" "$v" "$best_val"; then
      best=$size best_val=$v
    fi
  done
  echo "chosen $kind channels=[$best]" >> "$dir/chosen.txt"
  log "chosen for $kind: channels [$best] (val NCLL $best_val)"
  if [ -n "${SEEDS-1,2}" ]; then
    cells "$best" "${SEEDS-1,2}" "$kind" "$@"
  fi
done
