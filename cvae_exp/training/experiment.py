"""Building a new experiment from a config: its data, the static task, the network and its optimizer
(`build_experiment`), and the devices it trains on (`training_mesh`). What trains it is
`cvae_exp.training.program`; loading a finished run, the pre-trained baseline of an aided one included, is
`cvae_exp.runs.trained_run`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from hydra.utils import instantiate
from omegaconf import DictConfig

from cvae_exp.config import data_columns
from cvae_exp.data import sources
from cvae_exp.data.geometry import Geometry
from cvae_exp.data.pipeline import Splits, condition_dim, make_splits
from cvae_exp.errors import UserError
from cvae_exp.models.build import build_model, data_logit
from cvae_exp.training import devices, steps


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
    data_sha256: str = ""  # the raw data's content digest (sources.content_sha256)
    steps_per_epoch: int = 0  # the epoch of the schedules counted in epochs (optimizer.schedule=burda)

    @property
    def geometry(self) -> Geometry:
        """The images' height, width, channels and classes, as read from the data."""
        return self.splits.geometry

    @property
    def fingerprint(self) -> dict:
        """What a checkpoint records the run was trained on: the data source, the split sizes, the geometry and
        the digest of the data's contents (the same path may hold other images later)."""
        return {
            "source": self.source,
            **{name: len(getattr(self.splits, name).images) for name in ("train", "val", "test")},
            "geometry": self.geometry.record(),
            "content_sha256": self.data_sha256,
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


def build_experiment(cfg: DictConfig, abstract: bool = False) -> Experiment:
    """Loads the data and builds the network and optimizer that `cfg` describes (no devices yet); its data path
    and targets were checked by the command's pre-flight (cvae_exp.runs.preflight, or trained_run for a saved
    run's config). `abstract=True`: the parameters' shapes only (a run read from its checkpoint restores its
    own), no initial values computed."""
    raw = sources.load(cfg.data.name, cfg.data.path, cfg.data.hub, columns=data_columns(cfg), checked=True)
    check_geometry(steps.task_condition(cfg), raw.geometry, raw.source)
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
    task = steps.build_task(cfg, splits.dynamic, raw.geometry)
    bias = data_logit(splits.train.images) if cfg.model.output_bias == "data_logit" else None
    # An epoch of the training split, for the schedules counted in epochs (optimizer.schedule=burda).
    epoch = cfg.optimizer.steps_per_epoch or len(splits.train.images) // cfg.trainer.batch_size
    build_params, opt = _network(cfg, task.condition, raw.geometry, epoch, bias)
    graphdef, params = build_params(cfg.seed, abstract=abstract)
    return Experiment(
        raw.source,
        splits,
        task,
        graphdef,
        params,
        opt,
        lambda seed: build_params(seed)[1],
        cfg.model.baseline_run,
        data_sha256=raw.sha256,
        steps_per_epoch=epoch,
    )


def _network(cfg: DictConfig, condition: str, geometry: Geometry, steps_per_epoch: int, output_bias=None):
    """(seed -> (graphdef, params), optimizer) of the config's network on images of `geometry`: nothing of
    the data is read (`steps_per_epoch`: an epoch for the schedules counted in epochs; `output_bias`:
    model.output_bias=data_logit's first bias)."""

    def build_params(seed: int, abstract: bool = False):
        return build_model(
            cfg.model,
            condition_dim(condition, geometry),
            geometry,
            precision=cfg.trainer.precision,
            seed=seed,
            condition=condition,
            output_bias=output_bias,
            abstract=abstract,
        )

    opt = instantiate(
        cfg.optimizer, total_steps=cfg.trainer.max_steps, steps_per_epoch=steps_per_epoch, _convert_="all"
    )
    return build_params, opt


def state_shape(cfg: DictConfig, geometry: Geometry) -> Any:
    """The shapes of a run's training state (its checkpoints' `state` item, with the seed axis of a K-seed
    run), built from its config and the geometry its checkpoint recorded: reading a run's parameters needs
    none of its data (the schedule's epoch and the output bias change no shape)."""
    build_params, opt = _network(cfg, steps.task_condition(cfg), geometry, cfg.optimizer.steps_per_epoch or 1)
    _, params = build_params(cfg.seed, abstract=True)
    shape = jax.eval_shape(lambda p: steps.init_state(p, opt.tx, cfg.seed), params)
    lead = (cfg.trainer.num_seeds,) if cfg.trainer.num_seeds > 1 else ()
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(lead + a.shape, a.dtype), shape)


def check_geometry(condition: str, geometry: Geometry, source: str) -> None:
    """Refuses a condition the data cannot give: class labels it does not have, quadrants of an odd size."""
    if condition == "label" and geometry.classes == 0:
        raise UserError(
            f"The data ({source}) has no class labels, so data.condition=label has nothing to condition on: train "
            "with data.condition=none or quadrants, or name its label column with data.label_column."
        )
    if condition == "quadrants" and (geometry.height % 2 or geometry.width % 2):
        raise UserError(
            f"data.condition=quadrants halves the images' height and width, but the data ({source}) holds "
            f"{geometry.height}x{geometry.width} images: set data.resize=[H,W] to an even height and width."
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


# Bytes one value of an evaluation batch's images holds at least, on the host and on the device: the image,
# target, mask and output as float32 and a few more of the same size (a rough lower bound, for the check below).
_EVAL_BYTES_PER_VALUE = 8 * 4


def check_eval_batch(eval_batch_size: int, splits: Splits, mesh) -> None:
    """Refuses an evaluation batch that cannot fit in memory (`trainer.eval_batch_size=1e9` trained, then
    failed with a MemoryError at the first evaluation). Known once the data is loaded, before the first step;
    a batch larger than the splits is padded, so the padding counts too."""
    need = devices.round_to_devices(eval_batch_size, mesh) * _EVAL_BYTES_PER_VALUE * splits.geometry.dims
    have = devices.memory_bytes(mesh)
    if have is not None and need > have:
        largest = max(len(splits.val.images), len(splits.test.images))
        raise UserError(
            f"trainer.eval_batch_size={eval_batch_size} needs at least {need / 2**30:,.0f} GiB for one evaluation "
            f"batch, more than the {have / 2**30:,.0f} GiB there are: the largest split it evaluates holds "
            f"{largest:,} images, so at most {largest} is useful."
        )
