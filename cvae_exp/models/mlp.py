"""The multilayer perceptron every network of the model family is built from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """Dense layers with ReLU between them and no activation after the last.

    Layers are attributes `dense0`, `dense1`, ... so that parameter paths are plain strings, which
    keeps checkpoints readable and their tree structure stable.
    """

    def __init__(self, sizes: list[int], *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.depth = len(sizes) - 1
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            # dtype is the matmul input type (bf16 for mixed precision); parameters, accumulation
            # and everything between the matmuls stay fp32.
            layer = nnx.Linear(
                fan_in,
                fan_out,
                dtype=dtype,
                param_dtype=jnp.float32,
                preferred_element_type=jnp.float32,  # accumulate (and continue) in fp32
                rngs=rngs,
            )
            setattr(self, f"dense{i}", layer)

    def __call__(self, h: jax.Array) -> jax.Array:
        for i in range(self.depth):
            h = getattr(self, f"dense{i}")(h)
            if i < self.depth - 1:
                h = jax.nn.relu(h)
        return h.astype(jnp.float32)
