#!/usr/bin/env bash
# Wall time of one 8-job sweep (optimizer.lr x seed, paper size, batch 128) under the basic launcher and
# under hydra/launcher=vmap, compile, data loading and evaluation included, and whether both wrote the same
# results (the largest relative val/elbo difference between a job and its twin). One JSON object on stdout.
#   scripts/bench_sweep.sh <out dir> <MNIST folder> [steps]
set -euo pipefail
out=${1:?usage: scripts/bench_sweep.sh <out dir> <MNIST folder> [steps]}
data=${2:?usage: scripts/bench_sweep.sh <out dir> <MNIST folder> [steps]}
steps=${3:-50}
bin=${CVAE_BIN:-$(dirname "$0")/../.venv/bin}
# experiment=sohn2015's sizes and task (the CVAE, one quadrant given), written out: that experiment also
# sweeps its 12 cells, which a command line cannot take out of its multirun
args=("model.hidden=[1000,1000]" model.latent_dim=200 data.condition=quadrants data.n_given=1 data.val_size=10000
      "data.path=$data" trainer.batch_size=128 "trainer.max_steps=$steps" trainer.progress=false logger.images=false
      optimizer.lr=1e-3,3e-4 seed=0,1,2,3)
mkdir -p "$out"
timed() {  # name, then the command: seconds of wall time
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$@" > "$out/$name.log" 2>&1
  t1=$(date +%s.%N)
  python3 -c "print(round($t1 - $t0, 1))"
}
basic_s=$(timed basic "$bin/cvae-train" -m "${args[@]}" "hydra.sweep.dir=$out/basic")
vmap_s=$(timed vmap "$bin/cvae-train" -m hydra/launcher=vmap "${args[@]}" "hydra.sweep.dir=$out/vmap")
"$bin/python" - "$out" "$basic_s" "$vmap_s" "$steps" <<'EOF'
import json, os, sys
import jax
out, basic_s, vmap_s, steps = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
diffs = []
for job in range(8):
    a = json.load(open(f"{out}/basic/{job}/metrics.json"))["val/elbo"]
    b = json.load(open(f"{out}/vmap/{job}/metrics.json"))["val/elbo"]
    diffs.append(abs(a - b) / abs(a))
d = jax.devices()[0]
print(json.dumps({
    "jobs": 8, "steps": steps, "basic_wall_s": basic_s, "vmap_wall_s": vmap_s,
    "speedup": round(basic_s / vmap_s, 2), "max_rel_val_elbo_diff": max(diffs),
    "device": f"{d.platform}:{d.device_kind}", "cpu_cores": os.cpu_count(),
}))
EOF
