"""Loading a finished (or running) run directory for evaluation and sampling: its config, its data,
and the parameters of its best checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cvae_exp import checkpoint, trainer
from cvae_exp.config import Config, check_targets
from cvae_exp.data import sources
from cvae_exp.data.pipeline import PIXELS, Splits, condition_dim, make_splits
from cvae_exp.errors import UserError
from cvae_exp.models import build_model


@dataclass
class Experiment:
    """What a config builds before training: data, the static task, the network and its optimizer."""

    source: str
    splits: Splits
    task: trainer.Task
    graphdef: Any
    params: Any  # freshly initialised, on the host
    opt: Any  # cvae_exp.optim.Optimizer

    def init_state(self, seed: int) -> dict:
        return trainer.init_state(self.params, self.opt.tx, seed)


def build_experiment(cfg: DictConfig) -> Experiment:
    """Loads the data and builds the network and optimizer that `cfg` describes (no devices yet)."""
    check_targets(cfg)  # a saved config may come from someone else: instantiate only safe targets
    raw = sources.load(cfg.data.name, cfg.data.path, cfg.data.hub_id)
    splits = make_splits(raw, val_size=cfg.data.val_size, split_seed=cfg.data.split_seed, binarize=cfg.data.binarize)
    task = trainer.build_task(cfg, splits.dynamic)
    graphdef, params = build_model(
        cfg.model, condition_dim(task.condition), PIXELS, precision=cfg.trainer.precision, seed=cfg.seed
    )
    opt = instantiate(cfg.optimizer, total_steps=cfg.trainer.max_steps, _convert_="all")
    return Experiment(raw.source, splits, task, graphdef, params, opt)


@dataclass
class TrainedRun:
    cfg: DictConfig
    step: int
    graphdef: Any
    params: Any
    task: trainer.Task
    splits: Splits


def run_config(run_dir: Path) -> DictConfig:
    file = run_dir / ".hydra" / "config.yaml"
    if not file.is_file():
        raise UserError(f"run_dir={run_dir} is not a cvae-train run directory: {file} is missing.")
    # Onto the schema: keys added since the run was made get their defaults, and types are checked.
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(file))


def load_run(run_dir: str | Path, sharding=None) -> TrainedRun:
    """The run's best checkpoint by val/elbo (the newest where none has a val/elbo)."""
    run_dir = Path(run_dir).resolve()
    cfg = run_config(run_dir)
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"run_dir={run_dir} holds no checkpoints/ folder.")
    manager = checkpoint.make_manager(run_dir, cfg.checkpoint.keep, read_only=True)
    steps = checkpoint.best_first(manager)
    if not steps:
        raise UserError(f"run_dir={run_dir} holds no checkpoint.")

    exp = build_experiment(cfg)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.eval_shape(lambda: exp.init_state(cfg.seed))
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target)
    step, state, _ = checkpoint.restore_first(manager, target, steps)
    manager.close()
    return TrainedRun(cfg, step, exp.graphdef, state["params"], exp.task, exp.splits)
