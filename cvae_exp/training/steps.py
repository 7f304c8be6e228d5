"""The pure steps: `train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch, key) -> sums`.

Both are built once per run, share `loss_fn`, and are jitted once with donated state. The state is a plain
dict (step, params, opt_state, rng, and two counters of non-finite losses) so Orbax saves it as it is.
The per-step key is `fold_in(rng, step)`: the RNG stream depends only on the step, which makes a
resumed run draw exactly what an uninterrupted one would. With a leading member axis (`stack`) the same
steps train K models as one vmapped program.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cvae_exp.data.geometry import Geometry
from cvae_exp.data.pipeline import eval_batches, prepare
from cvae_exp.models import kinds
from cvae_exp.models.objectives import kl_weight, per_example_loss
from cvae_exp.training.devices import put_batch
from cvae_exp.training.optim import Optimizer


@dataclass(frozen=True)
class Task:
    """Everything static about the step (hashable, plain Python: no DictConfig reaches jit)."""

    kind: str
    condition: str
    geometry: Geometry  # of the data: sizes, classes, the quadrant masks
    dynamic: bool = False
    dequantize: bool = False  # the continuous Gaussian: uniform noise on the 8-bit pixels (model.likelihood=gaussian)
    n_given: int = 1
    layout: str = "left_first"
    omission_rate: float = 0.0
    beta: float = 1.0
    alpha: float = 0.5
    kl_warmup_steps: int = 0
    nan_policy: str = "stop"
    precision: str = "fp32"
    frozen_baseline: bool = False  # model.baseline_frozen with a baseline_run: its parameters never change
    iw_samples: int = 1  # model.iw_samples: k > 1 trains on the importance-weighted bound
    sampled_kl: bool = False  # model.kl=sampled


def build_task(cfg, dynamic: bool, geometry: Geometry) -> Task:
    """The static step description from a (validated) config and the data's geometry."""
    return Task(
        kind=cfg.model.kind,
        condition=task_condition(cfg),
        geometry=geometry,
        dynamic=dynamic,
        dequantize=cfg.model.likelihood == "gaussian",
        n_given=cfg.data.n_given,
        layout=cfg.data.quadrant_layout,
        omission_rate=cfg.data.omission_rate,
        beta=cfg.model.beta,
        alpha=cfg.model.alpha,
        kl_warmup_steps=cfg.model.kl_warmup_steps,
        nan_policy=cfg.trainer.nan_policy,
        precision=cfg.trainer.precision,
        frozen_baseline=bool(cfg.model.baseline_frozen and cfg.model.baseline_run),
        iw_samples=cfg.model.iw_samples,
        sampled_kl=cfg.model.kl == "sampled",
    )


def task_condition(cfg) -> str:
    """The condition the model sees: data.condition, or none for a kind with the fixed prior (the VAE)."""
    return "none" if kinds.kind(cfg.model.kind).fixed_prior else cfg.data.condition


def stack(trees: list) -> Any:
    """K pytrees of the same structure as one with a leading axis of size K (the vmapped seeds): one jitted
    program for the whole tree, not one small program per leaf shape (each is compiled once per process)."""
    return _stack(list(trees))


def member(tree: Any, i: int) -> Any:
    """Seed i's slice of a stacked pytree (one jitted program for every i)."""
    return _member(tree, jnp.int32(i))


@jax.jit
def _stack(trees: list) -> Any:
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@jax.jit
def _member(tree: Any, i: jax.Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> dict:
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "nonfinite": jnp.zeros((), jnp.int32),  # steps whose loss was NaN/Inf
        "first_nonfinite": jnp.full((), -1, jnp.int32),
    }


def loss_fn(params, graphdef, batch, key, step, task: Task, train: bool):
    """Mean loss over the batch and per-example metrics, for training and evaluation alike."""
    model = nnx.merge(graphdef, params)
    key_data, key_model = jax.random.split(key)
    x, y, mask = prepare(batch, key_data, task, train)
    beta = kl_weight(step, task.beta, task.kl_warmup_steps) if train else 1.0
    loss, metrics = per_example_loss(
        model,
        x,
        y,
        mask,
        key_model,
        kind=task.kind,
        beta=beta,
        alpha=task.alpha,
        iw_samples=task.iw_samples,
        sampled_kl=task.sampled_kl,
    )
    return loss, metrics


def train_update(state: dict, batch: dict, *, graphdef, opt: Optimizer, task: Task) -> tuple[dict, dict]:
    """One model's training step, pure and unjitted: `make_train_step` jits it (vmapped over seeds), and so
    does a vmap group (cvae_exp.training.members), with each member's own `task` and `opt`."""
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)

    def objective(params):
        loss, metrics = loss_fn(params, graphdef, batch, key, step, task, train=True)
        return loss.mean(), jax.tree.map(jnp.mean, metrics)

    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    updates, opt_state = opt.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if task.frozen_baseline:  # no gradient reaches it, but weight decay would still move it
        params = {**params, "baseline": state["params"]["baseline"]}
    finite = jnp.isfinite(loss)
    if task.nan_policy == "skip":  # keep the old parameters and moments for a non-finite step
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(params, state["params"]), keep(opt_state, state["opt_state"])
    bad = (~finite).astype(jnp.int32)
    new_state = {
        "step": step + 1,
        "params": params,
        "opt_state": opt_state,
        "rng": state["rng"],
        "nonfinite": state["nonfinite"] + bad,
        "first_nonfinite": jnp.where((state["first_nonfinite"] < 0) & (bad > 0), step + 1, state["first_nonfinite"]),
    }
    metrics = {**metrics, "loss": loss, "lr": opt.schedule(step)}
    return new_state, metrics


def jit_step(step_fn: Callable, task: Task, state_sharding, feed=None, block: bool = False) -> Callable:
    """`step_fn(state, batch, *extra)` jitted with donated state; with a DeviceFeed the jitted step takes the
    on-device split and cuts its own batch (at the newest member's step: every member that trains is there).

    `block` (a DeviceFeed only): the jitted function runs `n` steps in one dispatch, `(state, arrays, n, *extra)
    -> (state, the last step's metrics)` with `n` static: the n batches are gathered at once, then a `lax.scan`
    runs the same step over them (a loop whose body gathered from the whole split copied it every iteration on
    the CPU). The loop keeps a block inside one epoch (one order of the split)."""
    on_batch = step_fn
    if feed is not None and feed.on_device:

        def step_fn(state, arrays, *args):
            return on_batch(state, feed.cut(arrays, state["step"]), *args)

    static = ()
    if block:

        def step_fn(state, arrays, n, *args):
            batches = feed.cut_block(arrays, state["step"], n)
            state, metrics = jax.lax.scan(lambda s, b: on_batch(s, feed.constrain(b), *args), state, batches)
            return state, jax.tree.map(lambda m: m[-1], metrics)

        static = (2,)
    # The old state's buffers are donated to the new one, except for bf16 on a CPU: there XLA's
    # in-place update made the bf16 step ~15% slower (46 vs 40 ms at the paper's size, measured with the
    # same step donated and not), while fp32 steps time the same either way.
    donate = () if task.precision == "bf16" and jax.default_backend() == "cpu" else (0,)
    return jax.jit(
        step_fn, donate_argnums=donate, static_argnums=static, out_shardings=(state_sharding, state_sharding)
    )


def make_train_step(
    graphdef, opt: Optimizer, task: Task, state_sharding, seeds: int = 1, feed=None, block: bool = False
) -> Callable:
    """The jitted step `(state, feed(step)) -> (state, metrics)`. With `seeds` > 1 the state and the batch
    carry a leading seed axis and the step is `jax.vmap`ped over it: K independent models in one program.
    With a DeviceFeed the step takes the on-device split and cuts its batch itself; otherwise a batch."""

    def train_step(state, batch):
        return train_update(state, batch, graphdef=graphdef, opt=opt, task=task)

    return jit_step(jax.vmap(train_step) if seeds > 1 else train_step, task, state_sharding, feed, block)


def eval_sums(params, batch: dict, key, *, graphdef, task: Task) -> dict:
    """One model's weighted metric sums over an evaluation batch (pure, unjitted)."""
    _, metrics = loss_fn(params, graphdef, batch, key, jnp.int32(0), task, train=False)
    w = batch["weight"]
    return {k: jnp.sum(v * w) for k, v in metrics.items()} | {"count": jnp.sum(w)}


def make_eval_step(graphdef, task: Task, out_sharding, seeds: int = 1) -> Callable:
    """(params, batch, key) -> weighted sums; with `seeds` > 1, params and key carry the seed axis and
    every seed sees the same batch."""

    def eval_step(params, batch, key):
        return eval_sums(params, batch, key, graphdef=graphdef, task=task)

    step_fn = jax.vmap(eval_step, in_axes=(0, None, 0)) if seeds > 1 else eval_step
    return jax.jit(step_fn, out_shardings=out_sharding)


def eval_keys(seed: int, seeds: int = 1) -> jax.Array:
    """The validation key of a run with root `seed`, or the K keys of seeds seed..seed+K-1."""
    keys = [jax.random.key(s + 7919) for s in range(seed, seed + seeds)]
    return keys[0] if seeds == 1 else jnp.stack(keys)


def fold_in(key: jax.Array, i: int) -> jax.Array:
    """`jax.random.fold_in` for one key or a stack of keys (one per seed)."""
    return jax.random.fold_in(key, i) if key.ndim == 0 else jax.vmap(jax.random.fold_in, (0, None))(key, i)


def evaluate(eval_step, params, split, batch_size: int, sharding, key, progress: str | None = None) -> dict[str, Any]:
    """Means over a whole split (fixed keys per batch, so a result depends only on the params): floats,
    or arrays of K values when `params` and `key` carry a seed axis. `progress`: a label for a tqdm bar with
    the time left (cvae-eval's long passes), which waits for each batch so that the bar tells the truth."""
    totals = None
    bar = None
    if progress is not None:
        from tqdm import tqdm

        bar = tqdm(total=-(-len(split.images) // batch_size), desc=progress, unit="batch", dynamic_ncols=True)
    for i, batch in enumerate(eval_batches(split, batch_size)):
        sums = eval_step(params, put_batch(batch, sharding), fold_in(key, i))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if bar is not None:
            jax.block_until_ready(totals)  # host sync: only with a bar
            bar.update(1)
    if bar is not None:
        close_bar(bar)
    totals = jax.device_get(totals)  # host sync
    count = totals.pop("count")
    return {k: host_value(v / count) for k, v in totals.items()}


def host_value(v) -> Any:
    """A 0-d array as a float; a per-seed vector as a float64 numpy array."""
    v = np.asarray(v, np.float64)
    return float(v) if v.ndim == 0 else v


def params_sha256(params) -> str:
    """SHA-256 over the parameters' bytes, leaves in sorted path order: equal hashes, equal models."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def close_bar(bar) -> None:
    """Closes a tqdm bar holding tqdm's write lock: tqdm.close drops the bar from the bars that a log line
    clears first and only then takes the lock, and a line another thread logged in between (Orbax's saves,
    with verbose=true) was written onto the bar's line."""
    with bar.get_lock():
        bar.close()
