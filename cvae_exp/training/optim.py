"""The optimizer factory that `conf/optimizer/*.yaml` instantiates: an optax transformation with an
optional warm-up + cosine, or the stepwise Burda et al. (2016), learning-rate schedule and gradient clipping;
and Adam in the epsilon-hat form of Keras and yburda/iwae (`adam_epsilon_hat`), which optax does not offer."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cvae_exp.errors import UserError

BURDA_STAGES = 8  # 3^i epochs at learning rate lr * 10^(-i/7), i = 0..7: 3,280 epochs in all


class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    schedule: optax.Schedule  # the learning rate at a step, for logging


def burda_factors(rounded: bool = True) -> list[float]:
    """The learning rate of stage i = 0..7 relative to the first. yburda/iwae experiments.py sets
    1e-4 * round(10^(1 - i/7), 1), the factor rounded to one decimal (1, 0.72, 0.52, ..., 0.1); nbip/IWAE
    (main.py, tasks/task04.py) uses 10^(-i/7) as it is (rounded=False)."""
    return [round(10.0 ** (1 - i / 7), 1) / 10 if rounded else 10.0 ** (-i / 7) for i in range(BURDA_STAGES)]


def burda_schedule(lr: float, steps_per_epoch: int, rounded: bool = True) -> optax.Schedule:
    """Burda, Grosse, Salakhutdinov (2016), Section 5: 3^i epochs at lr * factor_i for i = 0..7, then the
    last rate for good. Stage i starts at epoch (3^i - 1) / 2 (0, 1, 4, 13, 40, 121, 364, 1093; 3,280 in all)."""
    boundaries = [(3**i - 1) // 2 * steps_per_epoch for i in range(1, BURDA_STAGES)]
    stages = [optax.constant_schedule(lr * f) for f in burda_factors(rounded)]
    return optax.join_schedules(stages, boundaries)


def make_optimizer(
    transform: Callable[..., optax.GradientTransformation],
    lr: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    clip_norm: float | None = None,
    total_steps: int = 1,
    steps_per_epoch: int | None = None,
) -> Optimizer:
    """`transform` is a partial optax constructor (e.g. optax.adam) that still needs its learning rate;
    `steps_per_epoch` counts the epochs of the burda schedules (the experiment passes it)."""
    if schedule in ("burda", "burda_unrounded"):
        if not steps_per_epoch:
            raise UserError(f"optimizer.schedule={schedule} counts epochs: set optimizer.steps_per_epoch.")
        lr_at = burda_schedule(lr, steps_per_epoch, rounded=schedule == "burda")
    elif schedule == "cosine":
        lr_at = warmup_cosine(lr, warmup_steps, max(total_steps, warmup_steps + 1))
    elif warmup_steps:
        lr_at = optax.linear_schedule(0.0, lr, warmup_steps)
    else:
        lr_at = optax.constant_schedule(lr)
    tx = transform(learning_rate=lr_at)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return Optimizer(tx, lr_at)


def warmup_cosine(lr, warmup_steps: int, decay_steps: int) -> optax.Schedule:
    """optax.warmup_cosine_decay_schedule to 0 (linear warm-up from 0 to `lr`, then a cosine decay to 0 at
    `decay_steps`), step for step the same values, built from its parts: that function compares its peak
    with 0 in Python (`alpha = end / peak`), which fails when `lr` is traced (a vmap member's own rate)."""
    return optax.join_schedules(
        [
            optax.linear_schedule(init_value=0.0 if warmup_steps else lr, end_value=lr, transition_steps=warmup_steps),
            optax.cosine_decay_schedule(init_value=lr, decay_steps=decay_steps - warmup_steps, alpha=0.0),
        ],
        [warmup_steps],
    )


class AdamHatState(NamedTuple):
    count: jax.Array  # updates made so far
    mu: optax.Updates  # first moment, uncorrected
    nu: optax.Updates  # second moment, uncorrected


def adam_epsilon_hat(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-7,
    *,
    nu_init: float = 0.0,
    grad_scale: float = 1.0,
    lagged: bool = False,
) -> optax.GradientTransformation:
    """Adam as Kingma & Ba (2015) write it just before their Section 2.1, the form Keras (tf.keras Adam:
    "epsilon hat") and yburda/iwae (optimizers.py) implement: at step t = 1, 2, ...

        update = -lr_t * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    with m, v the uncorrected moments. optax.adam adds eps to the bias-corrected sqrt(v_hat) instead, which is
    the same only once b2^t is negligible. yburda/iwae's own variant is `nu_init=1` (its second moments start
    at ones) with `lagged=True` (Theano applies all updates at once, so step t moves the parameters by the
    moments of steps < t; the first update is zero), and `grad_scale` = the batch size: it differentiates the
    log-likelihood summed over the batch where our loss is the mean, and Adam is scale-free except for eps
    and nu_init.
    """
    lr_at = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)

    def init(params):
        mu = jax.tree.map(jnp.zeros_like, params)
        nu = jax.tree.map(lambda p: jnp.full_like(p, nu_init), params)
        return AdamHatState(jnp.zeros([], jnp.int32), mu, nu)

    def update(grads, state, params=None):
        del params
        g = jax.tree.map(lambda x: grad_scale * x, grads)
        mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, state.mu, g)
        nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * jnp.square(x), state.nu, g)
        t = (state.count + 1).astype(jnp.float32)
        alpha = lr_at(state.count) * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        m, v = (state.mu, state.nu) if lagged else (mu, nu)
        updates = jax.tree.map(lambda a, b: -alpha * a / (jnp.sqrt(b) + eps), m, v)
        return updates, AdamHatState(optax.safe_increment(state.count), mu, nu)

    return optax.GradientTransformation(init, update)
