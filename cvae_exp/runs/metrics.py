"""What a training run reports: each seed's values out of per-seed arrays, the mean over the seeds, each seed's
final results, and what metrics.json holds (`final_metrics`, pure: no JAX, no files; `write_metrics` writes it).
`cvae_exp.runs.group` calls these for every job of a group; numpy only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def final_metrics(
    *,
    step: int,
    val: dict,
    test: dict,
    per_seed: list[dict],
    steps_run: int,
    batch_size: int,
    train_seconds: float,
    wall_seconds: float,
    previous: dict,
    source: str,
    train_examples: int,
    early,
    machine: dict,
) -> dict:
    """What metrics.json holds (before NaNs become null): the last validation summary, the test means, and
    how the run went. `val` is a summary (`summarize`), `test` the test pass's values (floats, or arrays over
    K seeds), `per_seed` each seed's results (`per_seed_results`), `previous` the metrics.json already there
    (a finished run resumed again trains nothing and keeps its examples_per_s), `early` the early stopping
    state, `machine` the devices, processes and hardware line ({"devices", "processes", "hardware"}). Pure: no JAX,
    no files."""
    num_seeds = len(per_seed)
    metrics = {
        "step": step,
        **{name: v for name, v in val.items() if name != "per_seed"},
        **summarize(test, per_seed=False),
        "devices": machine["devices"],
        "processes": machine["processes"],
        # all seeds together
        "examples_per_s": (
            steps_run * batch_size * num_seeds / train_seconds if steps_run else previous.get("examples_per_s")
        ),
        "skipped_steps": sum(result["skipped_steps"] for result in per_seed),
        "params_sha256": per_seed[0]["params_sha256"],
        "wall_s": wall_seconds,
        "data_source": source,
        "train_examples": train_examples,
        # early stopping (trainer.patience): whether it ended the run; the step of the best val/elbo of any
        # evaluation (the checkpoint cvae-eval and cvae-sample use)
        "stopped_early": early.done,
        "best_step": early.best_seen_step,
        "hardware": machine["hardware"],
    }
    if num_seeds > 1:  # top-level values are means over the seeds; each seed's own values here
        metrics |= {"num_seeds": num_seeds, "seeds": per_seed}
    return metrics


def prefixed(split: str, values: dict) -> dict:
    return {f"{split}/{name}": v for name, v in values.items()}


def seed_values(metrics: dict, i: int) -> dict:
    """Seed i's values from metrics that are floats (one seed) or per-seed arrays."""
    return {name: float(np.asarray(v)[i]) if np.ndim(v) else float(v) for name, v in metrics.items()}


def summarize(metrics: dict, per_seed: bool = True) -> dict:
    """Floats: a single run's values, or the mean over the seeds (plus each seed's under "per_seed")."""
    out = {name: float(np.mean(v)) for name, v in metrics.items()}
    if per_seed and any(np.ndim(v) for v in metrics.values()):
        out["per_seed"] = {name: [float(x) for x in v] for name, v in metrics.items()}
    return out


def per_seed_results(state, val: dict, test: dict, seeds: list[int]) -> list[dict]:
    """Each seed's final values, parameters' hash and skipped steps, for metrics.json."""
    import jax

    from cvae_exp.training import steps

    val = val.get("per_seed", val)
    skipped = np.asarray(jax.device_get(state["nonfinite"])).reshape(-1)
    results = []
    for i, seed in enumerate(seeds):
        params = state["params"] if len(seeds) == 1 else steps.member(state["params"], i)
        results.append(
            {
                "seed": seed,
                **seed_values(val, i),
                **seed_values(test, i),
                "skipped_steps": int(skipped[i]),
                "params_sha256": steps.params_sha256(params),
            }
        )
    return results


def strict(metrics: dict) -> dict:
    """NaN and infinities as null: metrics.json stays strict JSON whatever the run went through."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def hparams(plain: dict) -> dict:
    """A run's hyperparameters for the HPARAMS summary (dotted keys of the groups a sweep varies): the same
    names in every job, whatever its model kind, so the HPARAMS view compares them all."""
    from cvae_exp.config import dotted

    return dotted(plain, ("model", "data", "optimizer", "trainer", "seed"))


def write_metrics(run_dir: Path, metrics: dict) -> None:
    """<run dir>/metrics.json, strict JSON."""
    (run_dir / "metrics.json").write_text(json.dumps(strict(metrics), indent=2) + "\n")


def likelihood_note(likelihood: str, min_log_var: float) -> str | None:
    """What val/elbo (and test/elbo, cvae-eval's ncll) means under model.likelihood=gaussian, logged when such a
    run starts: a density of pixel values, which the variance floor bounds from below, not the probability of an
    image; None for the Bernoulli likelihood, whose numbers are probabilities of binary pixels."""
    if likelihood != "gaussian":
        return None
    floor = 0.5 * (math.log(2 * math.pi) + min_log_var)  # -log N(y; y, exp(min_log_var)): a pixel predicted exactly
    return (
        "model.likelihood=gaussian: val/elbo and test/elbo are negative log-densities of pixel values in [0, 1] "
        f"(nats), not probabilities of images; they fall below 0 as the model grows sure, down to {floor:.2f} per "
        f"pixel ({784 * floor:,.0f} per 28x28 image) at the variance floor model.min_log_var={min_log_var:g}, "
        "and compare neither with Bernoulli runs nor with published MNIST likelihoods."
    )
