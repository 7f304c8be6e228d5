"""Loading a finished (or running) run directory: its config, the parameters of its best checkpoint
(`load_run`, for evaluation and sampling), and the pre-trained baseline an aided run starts from
(`baseline_params`, model.baseline_run)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig

from cvae_exp.config import onto_schema, read_run_config
from cvae_exp.data.pipeline import Splits
from cvae_exp.errors import UserError
from cvae_exp.runs import checkpoint
from cvae_exp.runs.rundir import RunLock
from cvae_exp.training import steps
from cvae_exp.training.experiment import Experiment, build_experiment

log = logging.getLogger("cvae_exp")


@dataclass
class TrainedRun:
    cfg: DictConfig
    step: int
    graphdef: Any
    params: Any
    task: steps.Task
    splits: Splits


def run_config(run_dir: Path) -> DictConfig:
    return read_run_config(run_dir, f"run_dir={run_dir}")


def load_run(run_dir: str | Path, sharding=None, seed_index: int = 0, which: str = "best") -> TrainedRun:
    """The run's best checkpoint by val/elbo (the newest where none has a val/elbo), or with which="last"
    its newest (eval.checkpoint=last); of a run that trained K seeds together (trainer.num_seeds=K), the
    model of seed `seed` + `seed_index`."""
    run_dir = Path(run_dir).resolve()
    cfg = run_config(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"run_dir={run_dir} holds no checkpoints/ folder.")
    manager = checkpoint.make_manager(run_dir, cfg.checkpoint.keep, read_only=True)
    ranked = checkpoint.best_first(manager) if which == "best" else sorted(manager.all_steps(), reverse=True)
    if not ranked:
        raise UserError(f"run_dir={run_dir} holds no checkpoint.")
    # The config the weights were trained with, as the checkpoint recorded it (.hydra/config.yaml is the
    # latest launch's, which may have changed cadences on resume).
    saved = checkpoint.first_meta(manager, ranked)
    if saved and saved[1].get("config"):
        cfg = onto_schema(saved[1]["config"])

    num_seeds = cfg.trainer.num_seeds
    if not 0 <= seed_index < num_seeds:
        raise UserError(
            f"eval.seed_index={seed_index} is out of range: run_dir={run_dir} trained {num_seeds} seed(s), "
            f"so it must lie in 0..{num_seeds - 1}."
        )

    exp = build_experiment(cfg)
    restored = checkpoint.restore_first(manager, state_target(exp, cfg, sharding), ranked)
    if restored.damaged:
        _set_aside(run_dir, manager, restored.damaged)
    manager.close()
    state = restored.state
    params = steps.member(state["params"], seed_index) if num_seeds > 1 else state["params"]
    return TrainedRun(cfg, restored.step, exp.graphdef, params, exp.task, exp.splits)


def state_target(exp: Experiment, cfg: DictConfig, sharding=None) -> Any:
    """The abstract state a checkpoint of this run restores onto (with the seed axis of a K-seed run)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.eval_shape(lambda: exp.init_state(cfg.seed))  # no baseline run read: the shapes are the same
    lead = (cfg.trainer.num_seeds,) if cfg.trainer.num_seeds > 1 else ()  # the seed axis of a vmapped run
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(lead + a.shape, a.dtype, sharding=sharding), target)


def baseline_params(baseline_run: str | None) -> Any:
    """The best params of `baseline_run` (model.baseline_run), on the host, for `Experiment.init_state`;
    None without one."""
    if not baseline_run:
        return None
    return _best_params(str(Path(baseline_run).expanduser().resolve()))


@functools.lru_cache(maxsize=4)
def _best_params(run_dir: str) -> Any:
    """A finished run's best params, on the host (read once per process, however many seeds start from it)."""
    return jax.device_get(load_run(run_dir).params)


def _set_aside(run_dir: Path, manager, steps: list[int]) -> None:
    """Damaged checkpoints found while loading go to damaged_checkpoints/, unless the run is live (a
    training process holds its lock and still owns its checkpoints): then they stay, reported."""
    try:
        with RunLock(run_dir, grace_s=0):
            checkpoint.set_aside(manager, steps)
    except UserError:
        log.warning("The damaged checkpoints stay in place: a live run holds %s.", run_dir)
    except OSError as err:  # a run directory this command may only read: reported, and left as it is
        log.warning("The damaged checkpoints stay in place: %s cannot be changed (%s).", run_dir, err.strerror)
