"""The optimizer factory that `conf/optimizer/*.yaml` instantiates: an optax transformation with an
optional warm-up + cosine learning-rate schedule and gradient clipping."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optax


class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    schedule: optax.Schedule  # the learning rate at a step, for logging


def make_optimizer(
    transform: Callable[..., optax.GradientTransformation],
    lr: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    clip_norm: float | None = None,
    total_steps: int = 1,
) -> Optimizer:
    """`transform` is a partial optax constructor (e.g. optax.adam) that still needs its learning rate."""
    if schedule == "cosine":
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
