"""`cvae-eval run_dir=<run dir>`: the negative conditional log-likelihood of the run's best checkpoint.

Writes `<run dir>/eval.json` and prints it as the last line: `ncll_is` (importance sampling from
q(z | x, y)), `ncll_mc` (Monte Carlo from the prior), `neg_elbo`, and for the baseline the exact
value; `ncll` is the headline figure (IS where the model has q, MC for the GSNN, exact for the
baseline); `*_per_pixel` divide by the scored dimensions; `*_sem` is the standard error of the mean over the
evaluated images. All in nats per image, lower is better. On 8-bit data (`data.binarize=none`) also
`*_bits_per_dim`: nats / (scored dimensions x ln 2), the unit the field reports for 8-bit images (with the
dequantized `gaussian` likelihood an upper bound on the discrete figure). `eval.examples=N` evaluates the first N digits of the
split; `eval.tag=T` writes eval_<split>_T.json instead of eval_<split>.json (for studies beside the table,
e.g. other S); `eval.checkpoint=last` scores the newest checkpoint instead of the best by val/elbo.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cvae_exp.cli import CONF_DIR, console, exit_on_user_error, no_wait_after_storage_failure
from cvae_exp.config import (
    EvalApp,
    check_keys,
    register_configs,
    require_run_dir,
    trained_run_config,
    trusted_modules,
    validate_eval,
)
from cvae_exp.models.kinds import kind
from cvae_exp.runs import launch

register_configs()


def make_ncll_step(graphdef, task, samples: int, chunk: int):
    """(params, batch, key) -> weighted sums of the per-example estimates, jitted once."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cvae_exp.data.pipeline import prepare
    from cvae_exp.models.distributions import log_likelihood
    from cvae_exp.models.objectives import conditional_nll

    has = kind(task.kind)

    def step(params, batch, key):
        model = nnx.merge(graphdef, params)
        x, y, mask = prepare(batch, key, task)
        if not has.latent:
            per_example = {"ncll_exact": -log_likelihood(y, model(x), mask)}
        else:
            per_example = conditional_nll(
                model, x, y, mask, key, samples=samples, chunk=min(chunk, samples), has_q=has.recognition
            )
        w = batch["weight"]
        sums = {k: jnp.sum(v * w) for k, v in per_example.items()}
        sums |= {f"{k}_sq": jnp.sum(jnp.square(v) * w) for k, v in per_example.items()}  # for the standard error
        return sums | {"pixels": jnp.sum(mask.sum(-1) * w), "count": jnp.sum(w)}

    return jax.jit(step)


def evaluate_run(
    run_dir: str,
    samples: int,
    split: str,
    chunk: int,
    batch_size: int,
    seed: int = 0,
    seed_index: int = 0,
    examples: int = 0,
    trust=(),
    progress: bool = False,
    which: str = "best",
) -> dict:
    import jax

    from cvae_exp.data.pipeline import Split, eval_batches
    from cvae_exp.runs.trained_run import load_run
    from cvae_exp.training import devices
    from cvae_exp.training.steps import evaluate

    mesh = devices.make_mesh("all")
    run = load_run(run_dir, sharding=devices.replicated(mesh), seed_index=seed_index, trust=trust, which=which)
    launch.release_log()  # accepted: the log may reach <run dir>/evaluate.log
    batch_size = devices.round_to_devices(batch_size, mesh)
    data = run.splits.test if split == "test" else run.splits.val
    if examples:  # the first `examples` digits: a fixed subset, the same for every run
        data = Split(data.images[:examples], data.labels[:examples])
    step = make_ncll_step(run.graphdef, run.task, samples, chunk)
    sharding, key = devices.data_sharded(mesh), jax.random.key(seed)
    start = time.perf_counter()
    first = devices.put_batch(next(eval_batches(data, batch_size)), sharding)
    step = step.lower(run.params, first, key).compile()  # compiled once, before the timed pass
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    # The same batched loop as the validation pass: per-example means over the split (a host sync).
    label = f"{split} ({len(data.images):,} digits, {samples} samples)" if progress else None
    result = evaluate(step, run.params, data, batch_size, sharding, key, progress=label)
    seconds = time.perf_counter() - start
    pixels = result.pop("pixels")  # scored dimensions per example
    n = len(data.images)
    squares = {k[: -len("_sq")]: result.pop(k) for k in list(result) if k.endswith("_sq")}
    headline = kind(run.task.kind).headline  # IS with q, MC without, exact for the baseline
    result["ncll"] = result.get(f"ncll_{headline}")
    eight_bit = run.cfg.data.binarize == "none"  # bits per dimension: the figure of 8-bit image models
    bits = {f"{k}_bits_per_dim": v / (pixels * math.log(2.0)) for k, v in result.items()} if eight_bit else {}
    result |= {f"{k}_per_pixel": v / pixels for k, v in result.items()} | bits
    # Standard error over the digits: the sample standard deviation of the per-digit values over sqrt(n).
    sems = {f"{k}_sem": math.sqrt(max(sq - result[k] ** 2, 0.0) * n / max(n - 1, 1) / n) for k, sq in squares.items()}
    result |= sems
    result["ncll_sem"] = sems.get(f"ncll_{headline}_sem")
    result |= {
        "model": run.cfg.model.kind,
        "condition": run.task.condition,
        "n_given": run.cfg.data.n_given if run.task.condition == "quadrants" else None,
        "checkpoint_step": run.step,
        "checkpoint": which,
        "seed": run.cfg.seed + seed_index,  # the model's training seed
        "split": split,
        "samples": samples if kind(run.task.kind).latent else 0,
        "examples": n,
        "scored_pixels_per_example": pixels,
        "likelihood": run.cfg.model.likelihood,
        "geometry": run.task.geometry.record(),
        "seconds": seconds,  # the evaluation pass, compilation excluded
        "compile_seconds": compile_seconds,
        "devices": mesh.size,
    }
    return result


def run(cfg: DictConfig) -> dict:
    """cvae-eval's work on a composed `eval` config: evaluates, writes eval.json (the latest evaluation) and
    eval_<split>.json (one per split for the reports; eval_<split>_<tag>.json a tagged one, which the reports
    leave alone), and returns the result (cvae_exp.api.evaluate returns it too)."""
    require_run_dir(cfg, "cvae-eval")
    check_keys(cfg, EvalApp)
    validate_eval(cfg)
    trained_run_config(Path(cfg.run_dir).resolve())  # a directory that is no trained run: refused before JAX starts
    e = cfg.eval
    result = evaluate_run(
        cfg.run_dir,
        e.samples,
        e.split,
        e.chunk,
        e.batch_size,
        cfg.seed,
        e.seed_index,
        examples=e.examples,
        trust=trusted_modules(cfg),
        progress=e.progress,
        which=e.checkpoint,
    )
    for name in ("eval.json", f"eval_{e.split}{'_' + e.tag if e.tag else ''}.json"):
        (Path(cfg.run_dir) / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


@no_wait_after_storage_failure
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
@exit_on_user_error
@console
def main(cfg: DictConfig) -> None:
    print(json.dumps(run(cfg)))


if __name__ == "__main__":
    main()
