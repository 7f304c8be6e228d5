"""How close vmap members come to their separate runs: a vmap sweep (optimizer.lr=1e-3,3e-4 x seed=0,1)
against each job trained alone, after each step count; prints one JSON line per step count with the largest
relative differences of val/elbo and of the parameters (max |a - b| / max |b| over every array).

    python scripts/vmap_equivalence.py data.path=<mnist> [more overrides]     (VMAP_STEPS=50,200 by default)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def train(args: list[str]) -> None:
    subprocess.run([str(BIN / "cvae-train"), *args], check=True, capture_output=True, text=True)


def params_of(run_dir: Path) -> list[np.ndarray]:
    import jax

    from cvae_exp.runs.trained_run import newest_params

    return [np.asarray(a, np.float64) for a in jax.tree.leaves(newest_params(run_dir))]


def compare(steps: int, overrides: list[str], tmp: Path) -> dict:
    common = [*overrides, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"checkpoint.every={steps}"]
    common += ["trainer.progress=false", "logger.images=false"]
    jobs = [("1e-3", 0), ("1e-3", 1), ("3e-4", 0), ("3e-4", 1)]  # the sweep's job order
    train(["-m", "hydra/launcher=vmap", *common, "optimizer.lr=1e-3,3e-4", "seed=0,1", f"hydra.sweep.dir={tmp}/sweep"])
    val, par = 0.0, 0.0
    for n, (lr, seed) in enumerate(jobs):
        alone = tmp / f"alone{n}"
        train([*common, f"optimizer.lr={lr}", f"seed={seed}", f"hydra.run.dir={alone}"])
        together = tmp / "sweep" / str(n)
        a, b = (json.loads((d / "metrics.json").read_text())["val/elbo"] for d in (together, alone))
        val = max(val, abs(a - b) / abs(b))
        for x, y in zip(params_of(together), params_of(alone), strict=True):
            par = max(par, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)))
    return {"steps": steps, "max_rel_val_elbo": val, "max_rel_params": par}


def main(overrides: list[str]) -> None:
    for steps in [int(s) for s in os.environ.get("VMAP_STEPS", "50,200").split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(compare(steps, overrides, Path(tmp))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
