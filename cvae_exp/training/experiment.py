"""Building a new experiment from a config: its data, the static task, the network and its optimizer
(`build_experiment`), and placing it on the devices for training: the mesh, the shardings, the feed and
the first state (`training_mesh`, `on_devices`). Loading a finished run, the pre-trained baseline of an
aided one included, is `cvae_exp.runs.trained_run`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from hydra.utils import instantiate
from omegaconf import DictConfig

from cvae_exp.config import check_targets
from cvae_exp.data import sources
from cvae_exp.data.pipeline import PIXELS, Splits, condition_dim, make_splits
from cvae_exp.errors import UserError
from cvae_exp.models.build import build_model, data_logit
from cvae_exp.training import devices, steps
from cvae_exp.training import feed as feeds


@dataclass
class Experiment:
    """What a config builds before training: data, the static task, the network and its optimizer."""

    source: str
    splits: Splits
    task: steps.Task
    graphdef: Any
    params: Any  # freshly initialised, on the host
    opt: Any  # cvae_exp.training.optim.Optimizer
    build_params: Callable[[int], Any]  # seed -> freshly initialised params (those of a run with that seed)
    baseline_run: str | None = None  # model.baseline_run: the run whose best params start the baseline submodule

    @property
    def fingerprint(self) -> dict:
        """What a checkpoint records the run was trained on: the data source and the split sizes."""
        return {
            "source": self.source,
            **{name: len(getattr(self.splits, name).images) for name in ("train", "val", "test")},
        }

    def init_state(self, seed: int, params: Any = None, baseline: Any = None) -> dict:
        """The state training starts from, with `params` (default: those built for the config's seed) and,
        given `baseline` (the pre-trained baseline's params, `trained_run.baseline_params`), the baseline
        submodule's replaced by those. Without it: the fresh state of the same shapes (a restore target, so
        an aided run loads without its baseline run)."""
        params = self.params if params is None else params
        if baseline is not None:
            params = with_baseline(params, baseline, self.baseline_run)
        return steps.init_state(params, self.opt.tx, seed)

    def initial_state(self, seeds: list[int], baseline: Any = None) -> dict:
        """One run's fresh state, or the stacked states of vmapped seeds (trainer.num_seeds > 1):
        seed s starts exactly as a single run with `seed=s` would (its own parameters and root key)."""
        if len(seeds) == 1:
            return self.init_state(seeds[0], baseline=baseline)
        return steps.stack([self.init_state(s, self.build_params(s), baseline) for s in seeds])


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
        val_from=cfg.data.val_from,
        val_holdout=cfg.data.val_holdout,
        shuffle=cfg.data.shuffle,
    )
    task = steps.build_task(cfg, splits.dynamic)
    bias = data_logit(splits.train.images) if cfg.model.output_bias == "data_logit" else None

    def build_params(seed: int):
        return build_model(
            cfg.model,
            condition_dim(task.condition),
            PIXELS,
            precision=cfg.trainer.precision,
            seed=seed,
            output_bias=bias,
        )

    graphdef, params = build_params(cfg.seed)
    # An epoch of the training split, for the schedules counted in epochs (optimizer.schedule=burda).
    epoch = cfg.optimizer.steps_per_epoch or len(splits.train.images) // cfg.trainer.batch_size
    opt = instantiate(cfg.optimizer, total_steps=cfg.trainer.max_steps, steps_per_epoch=epoch, _convert_="all")
    return Experiment(
        raw.source, splits, task, graphdef, params, opt, lambda seed: build_params(seed)[1], cfg.model.baseline_run
    )


def with_baseline(params: dict, loaded: Any, baseline_run: str | None) -> dict:
    """`params` with the baseline submodule's replaced by `loaded`, the best params of `baseline_run`.

    Sohn et al. (2015) build the CVAE on the pre-trained baseline network and then train everything
    together: the baseline starts from that run's parameters and is fine-tuned with the rest.
    """
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


def training_mesh(cfg: DictConfig) -> jax.sharding.Mesh:
    """The devices a run trains on (trainer.devices), refusing a batch they cannot split evenly."""
    mesh = devices.make_mesh(cfg.trainer.devices)
    devices.check_batch("trainer.batch_size", cfg.trainer.batch_size, mesh)
    return mesh


@dataclass
class OnDevices:
    """An experiment placed for training: what the train step is built with and starts from."""

    seeds: list[int]  # one model per seed, vmapped when there are several (trainer.num_seeds)
    state_sharding: Any  # replicated over the mesh
    batch_sharding: Any  # split along "data" (with the seed axis in front when there are several)
    feed: Any  # feed(step): the train step's second argument (feeds.make_feed)
    state: dict  # the first state, on the devices


def on_devices(exp: Experiment, cfg: DictConfig, mesh, baseline: Any = None) -> OnDevices:
    """The shardings, the training feed and the first state (with `baseline`, the pre-trained baseline's
    params, in an aided run) of `exp` on `mesh`."""
    train = cfg.trainer
    seeds = list(range(cfg.seed, cfg.seed + train.num_seeds))
    state_sharding = devices.replicated(mesh)
    batch_sharding = devices.data_sharded(mesh, train.num_seeds)
    feed = feeds.make_feed(
        exp.splits.train, train.batch_size, seeds, state_sharding, batch_sharding, train.data_on_device
    )
    state = jax.device_put(exp.initial_state(seeds, baseline), state_sharding)
    return OnDevices(seeds, state_sharding, batch_sharding, feed, state)
