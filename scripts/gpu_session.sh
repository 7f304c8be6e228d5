#!/usr/bin/env bash
# Every GPU measurement of the README and results/, in one script for a lent accelerator machine:
#   scripts/gpu_session.sh <out dir> <mnist folder> [overrides for every command, e.g. to try it small]
# 0. (WHEELS=<folder>) installs the wheels the machine's image lacks into /tmp/site, and makes
#    console-script shims in /tmp/bin (the image has JAX, flax, optax and orbax);
# 1. cvae-bench, experiment=sohn2015: batch 128 / 1024 x fp32 / bf16 x 1 / 8 vmapped seeds, each beside
#    the bare JAX loop (and, for bf16, the fp32 loop) in alternating windows -> <out>/bench.jsonl; then
#    one real 5,000-step cvae-train run (its examples_per_s includes evaluations and checkpoints);
# 2. Sohn et al. Table 1 (scripts/sohn2015_table.sh: baselines, then the aided cvae / gsnn / hybrid,
#    JOBS=9 processes sharing the GPU), S = 100, with as many steps per model as fit TRAIN_S seconds at
#    the step time stage 1 measured (a multiple of 2,000, at most 24,000; STEPS=<n> fixes it);
# 3. cvae-eval with S = 1000 over the 10,000 test digits for the 1-quadrant CVAE (evaluation speed);
# 4. quadrant completion grids from the trained 1-quadrant CVAE and baseline (cvae-sample).
# Stage time limits keep a slow stage from eating the next. After every stage, whatever finished is
# packed into <out>/results.tgz (all but checkpoints), beside session.log and bench.jsonl.
set -uo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd); data=$2; shift 2
work=${WORK:-/tmp/cvae_gpu_work}
mkdir -p "$work" && work=$(cd "$work" && pwd)
bin=${BIN:-.venv/bin}
log() { echo "[$(date +%T)] $*" | tee -a "$out/session.log"; }
pack() {  # everything but checkpoints (tens of MB per run)
  (cd "$work" && find . -path '*/checkpoints' -prune -o -type f -print | tar -czf "$out/results.tgz" -T -)
}

if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl
  # module:wheel pairs, installed only where the image lacks the module
  for pair in PIL:pillow tqdm:tqdm yaml:pyyaml google.protobuf:protobuf matplotlib:matplotlib contourpy:contourpy \
    cycler:cycler fontTools:fonttools kiwisolver:kiwisolver pyparsing:pyparsing dateutil:python_dateutil six:six \
    packaging:packaging; do
    python3 -c "import ${pair%%:*}" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site \
      "$WHEELS"/extra/"${pair#*:}"-*.whl
  done
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  mkdir -p /tmp/bin && bin=/tmp/bin
  for tool in train:train eval:evaluate sample:sample report:report bench:bench; do
    printf '#!/bin/sh\nexec python3 -m cvae_exp.%s "$@"\n' "${tool#*:}" >"/tmp/bin/cvae-${tool%%:*}"
    chmod +x "/tmp/bin/cvae-${tool%%:*}"
  done
  log "setup: $(python3 -c 'import jax, flax, optax, orbax.checkpoint, hydra, tensorboardX; print(jax.__version__, jax.devices())' 2>&1 | tail -1)"
fi

stages=${STAGES:-1234}  # e.g. STAGES=1: the benchmarks only
[[ $stages == *1* ]] && log "stage 1: cvae-bench" && timeout "${BENCH_S:-110}" "$bin/cvae-bench" -m experiment=sohn2015 "data.path=$data" bench.steps=200 bench.warmup=20 \
  trainer.batch_size=128,1024 trainer.precision=fp32,bf16 trainer.num_seeds=1,8 \
  'hydra.sweeper.params={data.n_given:1,model:cvae}' \
  hydra.sweep.dir="$work/bench" 'hydra.sweep.subdir=b${trainer.batch_size}_${trainer.precision}_k${trainer.num_seeds}' "$@" \
  2>"$work/bench.stderr" | grep '^{' >>"$out/bench.jsonl"
log "stage 1 done: $(wc -l <"$out/bench.jsonl") bench results"
# A real run beside it: logging, evaluations every 1,000 steps and async checkpoints included.
rm -rf "$work/real_run"
[[ $stages == *1* ]] && timeout 90 "$bin/cvae-train" experiment=sohn2015 "data.path=$data" trainer.max_steps=5000 \
  trainer.progress=false hydra.run.dir="$work/real_run" "$@" >/dev/null 2>"$work/real_run.stderr" &&
  log "real run: $(python3 -c "import json; m = json.load(open('$work/real_run/metrics.json')); print({k: m[k] for k in ('examples_per_s', 'wall_s', 'val/elbo', 'hardware')})")"
pack

# Per step of the 12 models together: baseline ~0.4, gsnn ~0.7, cvae 1, hybrid ~1.3 CVAE steps, x 3 tasks,
# divided by ~1.5 for the parallel jobs, plus ~40 s of start-up and compilation; the CVAE step from stage 1.
pick_steps='
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
ms = next((r["step_ms"] for r in rows if r["batch_size"] == 128 and r["precision"] == "fp32" and r["num_seeds"] == 1), 2.0)
steps = (float(sys.argv[2]) - 40) / (10.2 * ms / 1e3 / 1.5)
print(int(max(2000, min(24000, steps // 2000 * 2000))))
'
[[ $stages == *2* ]] || exit 0
steps=${STEPS:-$(python3 -c "$pick_steps" "$out/bench.jsonl" "${TRAIN_S:-200}" 2>/dev/null || echo 10000)}
log "stage 2: Sohn et al. table, $steps steps per model"
JOBS=${JOBS:-9} BIN=$bin timeout "${TABLE_S:-330}" scripts/sohn2015_table.sh "$work/sohn2015" "data.path=$data" \
  "trainer.max_steps=$steps" trainer.eval_every=2000 checkpoint.every=2000 checkpoint.keep=1 "$@" \
  >"$work/table.stdout" 2>"$work/table.stderr"
log "stage 2 exit $?"
pack

log "stage 3: cvae-eval S=1000, test (tagged: the table's eval files stay S=100)"
timeout "${EVAL_S:-60}" "$bin/cvae-eval" run_dir="$work/sohn2015/cvae_n1_s0" eval.samples=1000 eval.split=test eval.tag=S1000 \
  2>"$work/eval1000.stderr" | grep '^{' >"$work/eval1000.json"
log "stage 3 done: $(cat "$work/eval1000.json")"
pack

log "stage 4: completion grids"
for kind in cvae baseline; do
  timeout 30 "$bin/cvae-sample" run_dir="$work/sohn2015/${kind}_n1_s0" sample.inputs=10 sample.completions=6 \
    sample.split=test sample.out=samples_test >/dev/null 2>>"$work/sample.stderr"
done
pack
log "done"
