"""Your own networks for cvae_exp: the worked example of docs/extending.md ("Your own network").

Train with them (from the repository root; the command names the package it trusts):

    PYTHONPATH=docs/examples cvae-train trust_modules=[mynets] model.net._target_=mynets.Joined \
        +model.net.width=64 +model.net.generation._target_=mynets.Painter

Every network of the model is then a `Joined`, except the generation network, a `Painter`.
tests/test_net_runs.py (test_a_trusted_user_module_trains_and_evaluates_and_every_command_names_the_trust) runs this
command on a small dataset.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Joined(nnx.Module):
    """Any role: the inputs joined into one vector, a tanh layer of `width` units, the flat output."""

    def __init__(self, spec, *, width: int = 32, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(sum(i.size for i in spec.inputs), width, rngs=rngs)
        self.out = nnx.Linear(width, spec.out_features, rngs=rngs)

    def __call__(self, *inputs: jax.Array) -> jax.Array:
        # z may carry sample axes in front ([S, B, L] in the importance-sampled evaluation): broadcast the rest.
        lead = jnp.broadcast_shapes(*(a.shape[:-1] for a in inputs))
        h = jnp.concatenate([jnp.broadcast_to(a, (*lead, a.shape[-1])) for a in inputs], axis=-1)
        return self.out(jnp.tanh(self.hidden(h)))


class Painter(nnx.Module):
    """Generation (or baseline): a dense layer to a feature map of the image's size, then a 3 x 3 convolution
    to the head's channels per pixel, returned as an image [..., height, width, out_channels]."""

    def __init__(self, spec, *, features: int = 4, rngs: nnx.Rngs):
        height, width, _ = spec.geometry.shape
        self.shape = (height, width, features)
        self.dense = nnx.Linear(sum(i.size for i in spec.inputs), height * width * features, rngs=rngs)
        self.conv = nnx.Conv(features, spec.out_channels, kernel_size=(3, 3), rngs=rngs)

    def __call__(self, *inputs: jax.Array) -> jax.Array:
        lead = jnp.broadcast_shapes(*(a.shape[:-1] for a in inputs))
        h = jnp.concatenate([jnp.broadcast_to(a, (*lead, a.shape[-1])) for a in inputs], axis=-1)
        maps = jax.nn.relu(self.dense(h)).reshape(-1, *self.shape)  # one batch axis for the convolution
        out = self.conv(maps)
        return out.reshape(*lead, *out.shape[1:])
