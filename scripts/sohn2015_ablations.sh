#!/usr/bin/env bash
# The ablations of the Sohn et al. (2015) table in one CSV: each variant is a sweep dir of
# scripts/sohn2015_table.sh cells trained with other settings; cvae-report --paper sohn2015 writes its
# table, and its rows go into <out.csv> with a first column naming the variant.
#   scripts/sohn2015_ablations.sh <out.csv> <variant>=<sweep dir> [<variant>=<sweep dir> ...]
# e.g. scripts/sohn2015_ablations.sh results/sohn2015_ablations.csv aid_frozen=outputs/abl_frozen ...
set -euo pipefail
out=$1; shift
bin=${BIN:-.venv/bin}
dirs=()
for pair in "$@"; do
  dir=${pair#*=}
  "$bin/cvae-report" "$dir" --paper sohn2015 >/dev/null
  dirs+=("${pair%%=*}=$dir/sohn2015_table1.csv")
done
"$bin/python" - "$out" "${dirs[@]}" <<'PY'
import csv, sys
rows, header = [], None
for pair in sys.argv[2:]:
    variant, path = pair.split("=", 1)
    with open(path) as f:
        reader = csv.reader(f)
        header = ["variant", *next(reader)]
        rows += [[variant, *row] for row in reader]
with open(sys.argv[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
print(f"{len(rows)} rows from {len(sys.argv) - 2} variants -> {sys.argv[1]}")
PY
