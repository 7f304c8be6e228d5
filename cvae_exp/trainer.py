"""The pure steps and the fit loop.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch, key) -> sums` are built
once per run, share `loss_fn`, and are jitted once with donated state. The state is a plain dict
(step, params, opt_state, rng, and two counters of non-finite losses) so Orbax saves it as it is.
The per-step key is `fold_in(rng, step)`: the RNG stream depends only on the step, which makes a
resumed run draw exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from cvae_exp.data.pipeline import Split, eval_batches, make_sampler, prepare
from cvae_exp.errors import Interrupted
from cvae_exp.objectives import kl_weight, per_example_loss
from cvae_exp.optim import Optimizer
from cvae_exp.parallel import put_batch

log = logging.getLogger("cvae_exp")


@dataclass(frozen=True)
class Task:
    """Everything static about the step (hashable, plain Python: no DictConfig reaches jit)."""

    kind: str
    condition: str
    dynamic: bool = False
    n_given: int = 1
    layout: str = "left_first"
    omission_rate: float = 0.0
    beta: float = 1.0
    alpha: float = 0.5
    kl_warmup_steps: int = 0
    nan_policy: str = "stop"
    precision: str = "fp32"
    frozen_baseline: bool = False  # model.baseline_frozen with a baseline_run: its parameters never change


def build_task(cfg, dynamic: bool) -> Task:
    """The static step description from a (validated) config."""
    return Task(
        kind=cfg.model.kind,
        condition="none" if cfg.model.kind == "vae" else cfg.data.condition,
        dynamic=dynamic,
        n_given=cfg.data.n_given,
        layout=cfg.data.quadrant_layout,
        omission_rate=cfg.data.omission_rate,
        beta=cfg.model.beta,
        alpha=cfg.model.alpha,
        kl_warmup_steps=cfg.model.kl_warmup_steps,
        nan_policy=cfg.trainer.nan_policy,
        precision=cfg.trainer.precision,
        frozen_baseline=bool(cfg.model.baseline_frozen and cfg.model.baseline_run),
    )


def stack(trees: list) -> Any:
    """K pytrees of the same structure as one with a leading axis of size K (the vmapped seeds)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member(tree: Any, i: int) -> Any:
    """Seed i's slice of a stacked pytree."""
    return jax.tree.map(lambda a: a[i], tree)


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
    x, y, mask = prepare(
        batch,
        key_data,
        dynamic=task.dynamic and train,
        condition=task.condition,
        n_given=task.n_given,
        layout=task.layout,
        omission_rate=task.omission_rate if train else 0.0,
    )
    beta = kl_weight(step, task.beta, task.kl_warmup_steps) if train else 1.0
    loss, metrics = per_example_loss(model, x, y, mask, key_model, kind=task.kind, beta=beta, alpha=task.alpha)
    return loss, metrics


class HostFeed:
    """Batches cut on the host by step number and sent to the devices every step (multi-process runs,
    or trainer.data_on_device=false). Both feeds keep the run's `sampler` (host batches by step)."""

    on_device = False

    def __init__(self, split: Split, batch_size: int, seeds: list[int], batch_sharding):
        self.sampler = make_sampler(split, batch_size, seeds[0], len(seeds))
        self.batch_sharding = batch_sharding

    def __call__(self, step: int):
        return put_batch(self.sampler.batch(step), self.batch_sharding)


class DeviceFeed:
    """The training split held on the devices: each epoch's order goes up once, and the jitted step cuts
    its own batch from it by step number, so a step costs the host nothing but its dispatch. The batches
    are exactly those of `BatchSampler` (the same orders, the same slices), hence the same results."""

    on_device = True

    def __init__(self, split: Split, batch_size: int, seeds: list[int], replicated, batch_sharding):
        self.sampler = make_sampler(split, batch_size, seeds[0], len(seeds))
        self.batch_size, self.steps_per_epoch = batch_size, self.sampler.steps_per_epoch
        self.replicated, self.batch_sharding = replicated, batch_sharding
        self.data = jax.device_put({"image": split.images, "label": split.labels}, replicated)
        self._epoch, self._arrays = -1, None

    def __call__(self, step: int) -> dict:
        epoch = step // self.steps_per_epoch
        if epoch != self._epoch:  # once per epoch: the new order(s), [N] or [K, N]
            order = jax.device_put(self.sampler.order(epoch).astype(np.int32), self.replicated)
            self._epoch, self._arrays = epoch, {**self.data, "order": order}
        return self._arrays

    def cut(self, arrays: dict, step: jax.Array) -> dict:
        """Inside jit: this step's batch, [B, ...] (or [K, B, ...] with K orders), split along "data"."""
        step = step.reshape(-1)[0]  # every seed is at the same step
        start = (step % self.steps_per_epoch) * self.batch_size
        idx = jax.lax.dynamic_slice_in_dim(arrays["order"], start, self.batch_size, axis=-1)
        batch = {"image": jnp.take(arrays["image"], idx, axis=0), "label": jnp.take(arrays["label"], idx, axis=0)}
        return jax.lax.with_sharding_constraint(batch, self.batch_sharding)


def make_feed(split: Split, batch_size: int, seeds: list[int], replicated, batch_sharding, on_device: bool):
    """The training batches of a run: `feed(step)` is the second argument of its train step."""
    if on_device and jax.process_count() == 1:
        return DeviceFeed(split, batch_size, seeds, replicated, batch_sharding)
    return HostFeed(split, batch_size, seeds, batch_sharding)


def make_train_step(graphdef, opt: Optimizer, task: Task, state_sharding, seeds: int = 1, feed=None) -> Callable:
    """The jitted step `(state, feed(step)) -> (state, metrics)`. With `seeds` > 1 the state and the batch
    carry a leading seed axis and the step is `jax.vmap`ped over it: K independent models in one program.
    With a DeviceFeed the step takes the on-device split and cuts its batch itself; otherwise a batch."""

    def train_step(state, batch):
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
            "first_nonfinite": jnp.where(
                (state["first_nonfinite"] < 0) & (bad > 0), step + 1, state["first_nonfinite"]
            ),
        }
        metrics = {**metrics, "loss": loss, "lr": opt.schedule(step)}
        return new_state, metrics

    step_fn = jax.vmap(train_step) if seeds > 1 else train_step
    if feed is not None and feed.on_device:
        on_batch = step_fn

        def step_fn(state, arrays):
            return on_batch(state, feed.cut(arrays, state["step"]))

    # The old state's buffers are donated to the new one, except for bf16 on a CPU: there XLA's
    # in-place update made the bf16 step ~15% slower (46 vs 40 ms at the paper's size, measured with the
    # same step donated and not), while fp32 steps time the same either way.
    donate = () if task.precision == "bf16" and jax.default_backend() == "cpu" else (0,)
    return jax.jit(step_fn, donate_argnums=donate, out_shardings=(state_sharding, state_sharding))


def make_eval_step(graphdef, task: Task, out_sharding, seeds: int = 1) -> Callable:
    """(params, batch, key) -> weighted sums; with `seeds` > 1, params and key carry the seed axis and
    every seed sees the same batch."""

    def eval_step(params, batch, key):
        _, metrics = loss_fn(params, graphdef, batch, key, jnp.int32(0), task, train=False)
        w = batch["weight"]
        return {k: jnp.sum(v * w) for k, v in metrics.items()} | {"count": jnp.sum(w)}

    step_fn = jax.vmap(eval_step, in_axes=(0, None, 0)) if seeds > 1 else eval_step
    return jax.jit(step_fn, out_shardings=out_sharding)


def eval_keys(seed: int, seeds: int = 1) -> jax.Array:
    """The validation key of a run with root `seed`, or the K keys of seeds seed..seed+K-1."""
    keys = [jax.random.key(s + 7919) for s in range(seed, seed + seeds)]
    return keys[0] if seeds == 1 else jnp.stack(keys)


def fold_in(key: jax.Array, i: int) -> jax.Array:
    """`jax.random.fold_in` for one key or a stack of keys (one per seed)."""
    return jax.random.fold_in(key, i) if key.ndim == 0 else jax.vmap(jax.random.fold_in, (0, None))(key, i)


def evaluate(eval_step, params, split, batch_size: int, sharding, key) -> dict[str, Any]:
    """Means over a whole split (fixed keys per batch, so a result depends only on the params): floats,
    or arrays of K values when `params` and `key` carry a seed axis."""
    totals = None
    for i, batch in enumerate(eval_batches(split, batch_size)):
        sums = eval_step(params, put_batch(batch, sharding), fold_in(key, i))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)  # host sync
    count = totals.pop("count")
    return {k: _py(v / count) for k, v in totals.items()}


def _py(v) -> Any:
    """A 0-d array as a float; a per-seed vector as a float64 numpy array."""
    v = np.asarray(v, np.float64)
    return float(v) if v.ndim == 0 else v


class StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop after the current step; a second one exits."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the first signal, for the exit code (128 + signum)
        self.started = False  # the first step has run (a signal before that stops the start-up instead)
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            # "Now" means now: die of the signal as if no handler were installed, without waiting for
            # a save in flight (a half-written checkpoint is a temporary folder that resume ignores).
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested, self.signum = True, signum
        if self.started:
            log.warning(
                "Received %s: finishing this step, saving a checkpoint, then stopping (send it again to exit at once).",
                signal.Signals(signum).name,
            )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFinite(Exception):
    def __init__(self, step: int):
        super().__init__(f"The loss became NaN or infinite at step {step}.")
        self.step = step


class TooManySkipped(Exception):
    """nan_policy=skip discarded more than `skip_limit` of the steps since the last evaluation."""

    def __init__(self, step: int, skipped: int, since: int, limit: float):
        super().__init__(
            f"trainer.nan_policy=skip discarded {skipped} of the {step - since} steps since step {since} "
            f"({skipped / (step - since):.0%}), more than trainer.skip_limit={limit} ({limit:.0%}), by step {step}."
        )
        self.step = step


@dataclass
class EarlyStopping:
    """Early stopping on val/elbo (the negative ELBO, lower is better; the mean over the seeds when there
    are several): the run stops after `patience` evaluations in a row that did not lower the best value
    so far by more than `min_delta`. patience 0: never. Only the evaluations of the eval_every cadence
    count. Its state travels in every checkpoint's JSON item, so a resumed run keeps counting."""

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int | None = None
    waited: int = 0  # evaluations since the best

    def update(self, step: int, value: float) -> None:
        if value < self.best - self.min_delta:  # False for NaN: a non-finite evaluation is no improvement
            self.best, self.best_step, self.waited = value, step, 0
        else:
            self.waited += 1

    @property
    def done(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience

    def state(self) -> dict:
        return {
            "best": None if math.isinf(self.best) else self.best,
            "best_step": self.best_step,
            "waited": self.waited,
        }

    def load(self, saved: dict | None) -> None:
        """Takes up the counting of a resumed run (its checkpoint's `state()`); patience and min_delta stay."""
        if saved:
            best = saved.get("best")
            self.best = math.inf if best is None else float(best)
            self.best_step, self.waited = saved.get("best_step"), int(saved.get("waited", 0))


@dataclass
class Loop:
    """The cadences and the side effects the fit loop calls; see `fit`."""

    max_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    batch_size: int  # per seed
    nan_policy: str
    progress: bool
    on_log: Callable[[int, dict], None]
    on_eval: Callable[[int, Any], dict]
    on_checkpoint: Callable[[int, Any, dict], None]
    seeds: int = 1  # models trained together (vmapped); metrics carry a seed axis when > 1
    early_stop: EarlyStopping = field(default_factory=EarlyStopping)
    skip_limit: float = 1.0  # nan_policy=skip: the largest share of skipped steps between evaluations


def fit(state, train_step, feed: Callable[[int], Any], loop: Loop):
    """Runs steps until `max_steps`, early stopping (`loop.early_stop`) or a stop request; returns
    (state, last val metrics, stopped), where `stopped` is the number of the signal that stopped the
    run, or None when it finished (early stopping included)."""
    start = current_step(state)
    val: dict = {}
    if loop.early_stop.done:  # resumed after it had stopped early: nothing left to train
        return state, val, None
    bar = tqdm(total=loop.max_steps, initial=start, disable=not loop.progress, dynamic_ncols=True, unit="step")
    window_start, window_steps = time.perf_counter(), 0
    skips = SkipCount(state, start, loop.skip_limit) if loop.nan_policy == "skip" else None
    with StopRequest() as stop:
        for step in range(start, loop.max_steps):
            # Host work for the next step overlaps the device's work on this one (async dispatch).
            state, metrics = train_step(state, feed(step))
            if not stop.started:
                if stop.requested:  # it came while the first step was compiled: nothing is trained yet
                    bar.close()
                    raise Interrupted(stop.signum)
                stop.started = True
            done = step + 1
            window_steps += 1
            bar.update(1)
            # One read of the flag per step: a signal that lands during this step's logging or evaluation
            # is acted on after the next step, so the stop always goes through the full log/eval/save path.
            stopping = stop.requested
            last = done == loop.max_steps or stopping
            if done % loop.log_every == 0 or last:
                host = jax.device_get(metrics)  # host sync: only on log steps
                _check_finite(state, loop.nan_policy)
                elapsed = time.perf_counter() - window_start
                host = {k: _py(v) for k, v in host.items()}
                # all seeds together; per seed it is this divided by loop.seeds
                host["examples_per_s"] = window_steps * loop.batch_size * loop.seeds / max(elapsed, 1e-9)
                host["skipped_steps"] = _py(jax.device_get(state["nonfinite"]))
                loop.on_log(done, host)
                bar.set_postfix(loss=f"{np.mean(host['loss']):.2f}", ex_s=f"{host['examples_per_s']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if done % loop.eval_every == 0 or last:
                _check_finite(state, loop.nan_policy)
                if skips is not None:
                    skips.check(state, done)
                val = loop.on_eval(done, state)
                if done % loop.eval_every == 0:
                    loop.early_stop.update(done, val["val/elbo"])
                    if loop.early_stop.done:
                        last = True
                        log.info(
                            "Early stopping at step %d: val/elbo has not improved on %.4f (step %s) in %d evaluations.",
                            done,
                            loop.early_stop.best,
                            loop.early_stop.best_step,
                            loop.early_stop.waited,
                        )
            if done % loop.checkpoint_every == 0 or last:
                _check_finite(state, loop.nan_policy)  # never save parameters past a NaN
                loop.on_checkpoint(done, state, val if done % loop.eval_every == 0 or last else {})
            if stopping:
                bar.close()
                return state, val, stop.signum
            if last:  # early stopping
                break
    bar.close()
    return state, val, None


class SkipCount:
    """nan_policy=skip's bound: at each evaluation, the share of the steps since the previous one whose update
    was discarded (the worst seed's) may not exceed `limit`."""

    def __init__(self, state, step: int, limit: float):
        self.limit, self.since, self.before = limit, step, self._read(state)

    @staticmethod
    def _read(state) -> np.ndarray:
        return np.asarray(jax.device_get(state["nonfinite"])).reshape(-1)  # host sync: evaluation steps only

    def check(self, state, step: int) -> None:
        now = self._read(state)
        skipped = int((now - self.before).max())
        if step > self.since and skipped / (step - self.since) > self.limit:
            raise TooManySkipped(step, skipped, self.since, self.limit)
        self.since, self.before = step, now


def current_step(state) -> int:
    """The step of a state, with or without a seed axis (every seed is at the same step)."""
    return int(np.asarray(jax.device_get(state["step"])).reshape(-1)[0])


def _check_finite(state, policy: str) -> None:
    """With several seeds, the first seed to go non-finite stops them all (policy stop)."""
    if policy == "stop" and np.any(np.asarray(state["nonfinite"]) > 0):  # host sync
        first = np.asarray(state["first_nonfinite"])
        raise NonFinite(int(first[first >= 0].min()))


def params_sha256(params) -> str:
    """SHA-256 over the parameters' bytes, leaves in sorted path order: equal hashes, equal models."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()
