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

from cvae_exp.config import (
    check_data_path,
    check_interpolations,
    check_targets,
    onto_schema,
    read_run_config,
    trained_run_config,
    with_trust,
)
from cvae_exp.data.geometry import Geometry
from cvae_exp.data.pipeline import Splits
from cvae_exp.errors import UserError
from cvae_exp.runs import checkpoint
from cvae_exp.runs.rundir import RunLock
from cvae_exp.training import steps
from cvae_exp.training.experiment import build_experiment, state_shape

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


def load_run(run_dir: str | Path, sharding=None, seed_index: int = 0, which: str = "best", trust=()) -> TrainedRun:
    """The run's best checkpoint by val/elbo (the newest where none has a val/elbo), or with which="last"
    its newest (eval.checkpoint=last), with its data; of a run that trained K seeds together
    (trainer.num_seeds=K), the model of seed `seed` + `seed_index`. `trust`: the command's trust_modules (a run
    built with a user's network needs its package named again)."""
    run_dir = Path(run_dir).resolve()
    cfg, step, state, geometry = _best_state(run_dir, sharding, seed_index, which, trust)
    check_data_path(cfg)  # the saved config's data, before it loads (its targets: _best_state)
    exp = build_experiment(cfg, abstract=True)  # the weights are the checkpoint's
    if not geometry.same_shape(exp.geometry):
        raise UserError(
            f"run_dir={run_dir} was trained on images of {geometry.describe()}, but its data now holds "
            f"{exp.geometry.describe()}: point the run's data.path back at its data."
        )
    params = steps.member(state["params"], seed_index) if cfg.trainer.num_seeds > 1 else state["params"]
    return TrainedRun(cfg, step, exp.graphdef, params, exp.task, exp.splits)


def _best_state(
    run_dir: Path, sharding=None, seed_index: int = 0, which: str = "best", trust=()
) -> tuple[DictConfig, int, Any, Geometry]:
    """(the config its weights were trained with, step, state, the geometry of its images) of the run's best
    checkpoint that verifies (damaged ones set aside unless the run is live); only the checkpoint is read,
    none of the data (a checkpoint without a geometry record was trained on MNIST)."""
    cfg = trained_run_config(run_dir)
    # A run that is still training saves and deletes checkpoints while this reads them: what vanished was not
    # damaged, and the ranking is made again from what is there now (a few tries; each save keeps `keep`).
    for attempt in range(_READ_TRIES):
        try:
            return _read_best(run_dir, cfg, sharding, seed_index, which, trust)
        except (checkpoint.Vanished, FileNotFoundError) as err:
            if attempt == _READ_TRIES - 1:
                raise UserError(
                    f"run_dir={run_dir} is still training, and its checkpoints were deleted by its keep policy "
                    f"{_READ_TRIES} times while they were read ({err}): raise checkpoint.keep or try again."
                ) from None
            log.info("The checkpoint being read was deleted by the live run (%s); reading again.", err)
    raise AssertionError("unreachable")


_READ_TRIES = 8


def _read_best(
    run_dir: Path, cfg: DictConfig, sharding, seed_index: int, which: str, trust=()
) -> tuple[DictConfig, int, Any, Geometry]:
    manager = checkpoint.make_manager(run_dir, cfg.checkpoint.keep, read_only=True)
    try:
        ranked = checkpoint.best_first(manager) if which == "best" else sorted(manager.all_steps(), reverse=True)
        if not ranked:
            raise UserError(f"run_dir={run_dir} holds no checkpoint.")
        # The config the weights were trained with, as the checkpoint recorded it (.hydra/config.yaml is the
        # latest launch's, which may have changed cadences on resume).
        saved = checkpoint.first_meta(manager, ranked)
        if saved and saved[1].get("config"):
            cfg = onto_schema(saved[1]["config"])
        check_interpolations(cfg)  # recorded as written: an ${oc.env:X} this shell lacks is named, not a traceback
        num_seeds = cfg.trainer.num_seeds
        if not 0 <= seed_index < num_seeds:
            raise UserError(
                f"eval.seed_index={seed_index} is out of range: run_dir={run_dir} trained {num_seeds} seed(s), "
                f"so it must lie in 0..{num_seeds - 1}."
            )
        # A saved config may come from someone else: instantiate only safe targets, and networks of the packages
        # this command (never the saved config) trusts.
        check_targets(with_trust(cfg, trust))
        geometry = Geometry.from_record(((saved[1] if saved else {}).get("data") or {}).get("geometry"))
        restored = checkpoint.restore_first(manager, state_target(cfg, geometry, sharding), ranked)
        if restored.damaged:
            _set_aside(run_dir, manager, restored.damaged)
        return cfg, restored.step, restored.state, geometry
    finally:
        manager.close()


def state_target(cfg: DictConfig, geometry: Geometry | None = None, sharding=None) -> Any:
    """The abstract state a checkpoint of the run `cfg` on images of `geometry` (default: MNIST's) restores
    onto (with the seed axis of a K-seed run)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shape = state_shape(cfg, geometry or Geometry.from_record(None))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shape)


def newest_params(run_dir: str | Path, trust=()) -> Any:
    """The parameters of a run's newest checkpoint that verifies, on the host (no data read)."""
    run_dir = Path(run_dir).resolve()
    cfg = with_trust(onto_schema(run_config(run_dir)), trust)
    check_targets(cfg)
    manager = checkpoint.make_manager(run_dir, cfg.checkpoint.keep, read_only=True)
    found = checkpoint.newest_meta(manager)
    geometry = Geometry.from_record(((found[1] if found else {}).get("data") or {}).get("geometry"))
    restored = checkpoint.restore_newest(manager, state_target(cfg, geometry))
    manager.close()
    return jax.device_get(restored.state["params"])


def baseline_params(baseline_run: str | None, trust=()) -> Any:
    """The best params of `baseline_run` (model.baseline_run), on the host, read from its verified checkpoint
    without its data; None without one. `trust`: the command's trust_modules, for a baseline of a user's network."""
    if not baseline_run:
        return None
    return _best_params(str(Path(baseline_run).expanduser().resolve()), tuple(str(t) for t in trust or ()))


@functools.lru_cache(maxsize=4)
def _best_params(run_dir: str, trust: tuple[str, ...] = ()) -> Any:
    """A finished run's best params, on the host (read once per process, however many seeds start from it)."""
    cfg, _, state, _ = _best_state(Path(run_dir), trust=trust)
    params = steps.member(state["params"], 0) if cfg.trainer.num_seeds > 1 else state["params"]
    return jax.device_get(params)


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
