"""The training batches of a run, by step number: cut on the host and sent every step (`HostFeed`), or
cut inside the jitted step from the split held on the devices (`DeviceFeed`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cvae_exp.data.pipeline import Split, make_sampler
from cvae_exp.training.devices import put_batch


class HostFeed:
    """Batches cut on the host by step number and sent to the devices every step (multi-process runs,
    or trainer.data_on_device=false). Both feeds keep the run's `sampler` (host batches by step)."""

    on_device = False

    def __init__(self, split: Split, batch_size: int, seeds: list[int], batch_sharding):
        self.sampler = make_sampler(split, batch_size, seeds)
        self.batch_sharding = batch_sharding

    def __call__(self, step: int):
        return put_batch(self.sampler.batch(step), self.batch_sharding)


class DeviceFeed:
    """The training split held on the devices: each epoch's order goes up once, and the jitted step cuts
    its own batch from it by step number, so a step costs the host nothing but its dispatch. The batches
    are exactly those of `BatchSampler` (the same orders, the same slices), hence the same results."""

    on_device = True

    def __init__(self, split: Split, batch_size: int, seeds: list[int], replicated, batch_sharding):
        self.sampler = make_sampler(split, batch_size, seeds)
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

    def cut_block(self, arrays: dict, step: jax.Array, n: int) -> dict:
        """Inside jit: the batches of the `n` steps from `step` (inside one epoch), gathered at once with a
        leading step axis, [n, B, ...] (or [n, K, B, ...]); each step's batch is exactly `cut`'s."""
        step = jnp.max(step)
        start = (step % self.steps_per_epoch) * self.batch_size
        idx = jax.lax.dynamic_slice_in_dim(arrays["order"], start, n * self.batch_size, axis=-1)
        idx = jnp.moveaxis(idx.reshape(*idx.shape[:-1], n, self.batch_size), -2, 0)
        return {"image": jnp.take(arrays["image"], idx, axis=0), "label": jnp.take(arrays["label"], idx, axis=0)}

    def constrain(self, batch: dict) -> dict:
        return jax.lax.with_sharding_constraint(batch, self.batch_sharding)

    def cut(self, arrays: dict, step: jax.Array) -> dict:
        """Inside jit: this step's batch, [B, ...] (or [K, B, ...] with K orders), split along "data"."""
        step = jnp.max(step)  # every seed is at the same step; in a vmap group, every member still training
        start = (step % self.steps_per_epoch) * self.batch_size
        idx = jax.lax.dynamic_slice_in_dim(arrays["order"], start, self.batch_size, axis=-1)
        batch = {"image": jnp.take(arrays["image"], idx, axis=0), "label": jnp.take(arrays["label"], idx, axis=0)}
        return jax.lax.with_sharding_constraint(batch, self.batch_sharding)


def make_feed(split: Split, batch_size: int, seeds: list[int], replicated, batch_sharding, on_device: bool):
    """The training batches of a run: `feed(step)` is the second argument of its train step."""
    if on_device and jax.process_count() == 1:
        return DeviceFeed(split, batch_size, seeds, replicated, batch_sharding)
    return HostFeed(split, batch_size, seeds, batch_sharding)
