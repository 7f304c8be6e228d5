"""`cvae-eval run_dir=<run dir>`: the negative conditional log-likelihood of the run's best checkpoint.

Writes `<run dir>/eval.json` and prints it as the last line: `ncll_is` (importance sampling from
q(z | x, y)), `ncll_mc` (Monte Carlo from the prior), `neg_elbo`, and for the baseline the exact
value; `ncll` is the headline figure (IS where the model has q, MC for the GSNN, exact for the
baseline); `*_per_pixel` divide by the scored pixels. All in nats, lower is better.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cvae_exp import launch
from cvae_exp.config import EvalApp, check_keys, register_configs, require_run_dir, validate_eval
from cvae_exp.train import CONF_DIR, exit_on_user_error, no_wait_after_storage_failure

register_configs()


def make_ncll_step(graphdef, task, samples: int, chunk: int):
    """(params, batch, key) -> weighted sums of the per-example estimates, jitted once."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cvae_exp.data.pipeline import prepare
    from cvae_exp.objectives import conditional_nll, log_likelihood

    def step(params, batch, key):
        model = nnx.merge(graphdef, params)
        x, y, mask = prepare(
            batch, key, dynamic=False, condition=task.condition, n_given=task.n_given, layout=task.layout
        )
        if task.kind == "baseline":
            per_example = {"ncll_exact": -log_likelihood(y, model(x), mask)}
        else:
            per_example = conditional_nll(
                model, x, y, mask, key, samples=samples, chunk=min(chunk, samples), has_q=task.kind != "gsnn"
            )
        w = batch["weight"]
        sums = {k: jnp.sum(v * w) for k, v in per_example.items()}
        return sums | {"pixels": jnp.sum(mask.sum(-1) * w), "count": jnp.sum(w)}

    return jax.jit(step)


def evaluate_run(
    run_dir: str, samples: int, split: str, chunk: int, batch_size: int, seed: int = 0, seed_index: int = 0
) -> dict:
    import jax

    from cvae_exp import parallel
    from cvae_exp.data.pipeline import eval_batches
    from cvae_exp.runs import load_run
    from cvae_exp.trainer import evaluate

    mesh = parallel.make_mesh("all")
    run = load_run(run_dir, sharding=parallel.replicated(mesh), seed_index=seed_index)
    launch.release_log()  # accepted: the log may reach <run dir>/evaluate.log
    batch_size = -(-batch_size // mesh.size) * mesh.size
    data = run.splits.test if split == "test" else run.splits.val
    step = make_ncll_step(run.graphdef, run.task, samples, chunk)
    sharding, key = parallel.data_sharded(mesh), jax.random.key(seed)
    start = time.perf_counter()
    first = parallel.put_batch(next(eval_batches(data, batch_size)), sharding)
    step = step.lower(run.params, first, key).compile()  # compiled once, before the timed pass
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # The same batched loop as the validation pass: per-example means over the split (a host sync).
    result = evaluate(step, run.params, data, batch_size, sharding, key)
    seconds = time.perf_counter() - start
    pixels = result.pop("pixels")  # scored pixels per example
    result["ncll"] = result.get("ncll_is", result.get("ncll_exact", result.get("ncll_mc")))
    result |= {f"{k}_per_pixel": v / pixels for k, v in result.items()}
    result |= {
        "model": run.cfg.model.kind,
        "condition": run.task.condition,
        "n_given": run.cfg.data.n_given if run.task.condition == "quadrants" else None,
        "checkpoint_step": run.step,
        "seed": run.cfg.seed + seed_index,  # the model's training seed
        "split": split,
        "samples": samples if run.task.kind != "baseline" else 0,
        "examples": len(data.images),
        "scored_pixels_per_example": pixels,
        "seconds": seconds,  # the evaluation pass, compilation excluded
        "compile_seconds": compile_seconds,
        "devices": mesh.size,
    }
    return result


@no_wait_after_storage_failure
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    require_run_dir(cfg, "cvae-eval")
    check_keys(cfg, EvalApp)
    validate_eval(cfg)
    e = cfg.eval
    result = evaluate_run(cfg.run_dir, e.samples, e.split, e.chunk, e.batch_size, cfg.seed, e.seed_index)
    # eval.json is the latest evaluation; eval_<split>.json keeps one per split for the reports.
    for name in ("eval.json", f"eval_{e.split}.json"):
        (Path(cfg.run_dir) / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
