"""Loading a finished (or running) run directory for evaluation and sampling: its config, its data,
and the parameters of its best checkpoint."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from hydra.utils import instantiate
from omegaconf import DictConfig

from cvae_exp import checkpoint, steps
from cvae_exp.config import check_targets, onto_schema, read_run_config
from cvae_exp.data import sources
from cvae_exp.data.pipeline import PIXELS, Splits, condition_dim, make_splits
from cvae_exp.errors import UserError
from cvae_exp.models import build_model
from cvae_exp.rundir import RunLock

log = logging.getLogger("cvae_exp")


@dataclass
class Experiment:
    """What a config builds before training: data, the static task, the network and its optimizer."""

    source: str
    splits: Splits
    task: steps.Task
    graphdef: Any
    params: Any  # freshly initialised, on the host
    opt: Any  # cvae_exp.optim.Optimizer
    build_params: Callable[[int], Any]  # seed -> freshly initialised params (those of a run with that seed)
    baseline_run: str | None = None  # model.baseline_run: the run whose best params start the baseline submodule

    def init_state(self, seed: int, pretrained: bool = True, params: Any = None) -> dict:
        """The state training starts from, with `params` (default: those built for the config's seed);
        `pretrained=False`: without reading model.baseline_run (the same shapes, for a restore target, so
        an aided run loads without its baseline run)."""
        params = self.params if params is None else params
        params = with_pretrained_baseline(params, self.baseline_run) if pretrained else params
        return steps.init_state(params, self.opt.tx, seed)

    def initial_state(self, seeds: list[int]) -> dict:
        """One run's fresh state, or the stacked states of vmapped seeds (trainer.num_seeds > 1):
        seed s starts exactly as a single run with `seed=s` would (its own parameters and root key)."""
        if len(seeds) == 1:
            return self.init_state(seeds[0])
        return steps.stack([self.init_state(s, params=self.build_params(s)) for s in seeds])


def build_experiment(cfg: DictConfig) -> Experiment:
    """Loads the data and builds the network and optimizer that `cfg` describes (no devices yet)."""
    check_targets(cfg)  # a saved config may come from someone else: instantiate only safe targets
    raw = sources.load(cfg.data.name, cfg.data.path, cfg.data.hub_id)
    splits = make_splits(
        raw,
        val_size=cfg.data.val_size,
        split_seed=cfg.data.split_seed,
        binarize=cfg.data.binarize,
        binarize_seed=cfg.data.binarize_seed,
    )
    task = steps.build_task(cfg, splits.dynamic)

    def build_params(seed: int):
        return build_model(cfg.model, condition_dim(task.condition), PIXELS, precision=cfg.trainer.precision, seed=seed)

    graphdef, params = build_params(cfg.seed)
    opt = instantiate(cfg.optimizer, total_steps=cfg.trainer.max_steps, _convert_="all")
    return Experiment(
        raw.source, splits, task, graphdef, params, opt, lambda seed: build_params(seed)[1], cfg.model.baseline_run
    )


def with_pretrained_baseline(params: dict, baseline_run: str | None) -> dict:
    """`params` with the baseline submodule's replaced by the best checkpoint of `baseline_run` (none: as is).

    Sohn et al. (2015) build the CVAE on the pre-trained baseline network and then train everything
    together: the baseline starts from that run's parameters and is fine-tuned with the rest.
    """
    if not baseline_run:
        return params
    loaded = _best_params(str(Path(baseline_run).expanduser().resolve()))
    fresh = params["baseline"]
    shapes = [
        (jax.tree_util.keystr(k), getattr(a, "shape", None)) for k, a in jax.tree_util.tree_leaves_with_path(fresh)
    ]
    found = [(jax.tree_util.keystr(k), a.shape) for k, a in jax.tree_util.tree_leaves_with_path(loaded)]
    if shapes != found:
        raise UserError(
            f"model.baseline_run={baseline_run} holds a network of shapes {found}, but this model's baseline has "
            f"{shapes}: set model.baseline_hidden to that run's model.hidden."
        )
    return {**params, "baseline": jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), loaded, fresh)}


@functools.lru_cache(maxsize=4)
def _best_params(run_dir: str) -> Any:
    """A finished run's best params, on the host (read once per process, however many seeds start from it)."""
    return jax.device_get(load_run(run_dir).params)


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


def load_run(run_dir: str | Path, sharding=None, seed_index: int = 0) -> TrainedRun:
    """The run's best checkpoint by val/elbo (the newest where none has a val/elbo); of a run that
    trained K seeds together (trainer.num_seeds=K), the model of seed `seed` + `seed_index`."""
    run_dir = Path(run_dir).resolve()
    cfg = run_config(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"run_dir={run_dir} holds no checkpoints/ folder.")
    manager = checkpoint.make_manager(run_dir, cfg.checkpoint.keep, read_only=True)
    ranked = checkpoint.best_first(manager)
    if not ranked:
        raise UserError(f"run_dir={run_dir} holds no checkpoint.")
    # The config the weights were trained with, as the checkpoint recorded it (.hydra/config.yaml is the
    # latest launch's, which may have changed cadences on resume).
    saved = checkpoint.first_meta(manager, ranked)
    if saved and saved[1].get("config"):
        cfg = onto_schema(saved[1]["config"])

    k = cfg.trainer.num_seeds
    if not 0 <= seed_index < k:
        raise UserError(
            f"eval.seed_index={seed_index} is out of range: run_dir={run_dir} trained {k} seed(s), "
            f"so it must lie in 0..{k - 1}."
        )

    exp = build_experiment(cfg)
    restored = checkpoint.restore_first(manager, state_target(exp, cfg, sharding), ranked)
    if restored.damaged:
        _set_aside(run_dir, manager, restored.damaged)
    manager.close()
    state = restored.state
    params = steps.member(state["params"], seed_index) if k > 1 else state["params"]
    return TrainedRun(cfg, restored.step, exp.graphdef, params, exp.task, exp.splits)


def state_target(exp: Experiment, cfg: DictConfig, sharding=None) -> Any:
    """The abstract state a checkpoint of this run restores onto (with the seed axis of a K-seed run)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.eval_shape(lambda: exp.init_state(cfg.seed, pretrained=False))
    lead = (cfg.trainer.num_seeds,) if cfg.trainer.num_seeds > 1 else ()  # the seed axis of a vmapped run
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(lead + a.shape, a.dtype, sharding=sharding), target)


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
