"""The multilayer perceptron (`MLP`), the default network of every role (`MLPNet`, `model/net=mlp`), its
activations, and the bf16 matmul both it and the convolutional network's dense layers use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w with bf16 inputs and fp32 accumulation and output, in the forward AND the backward pass.

    JAX's own transpose of a bf16 dot with `preferred_element_type=float32` computes both backward
    products in fp32 (it converts the saved bf16 operands back up), which on a CPU made the whole bf16
    step slower than fp32; here the cotangent is cast to bf16 and all three products run on bf16 inputs.
    """
    return _bf16_dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))


def _bf16_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(x, w):
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return _bf16_dot(xb, wb), (xb, wb)


def _bf16_matmul_bwd(saved, g):
    xb, wb = saved
    gb = g.astype(jnp.bfloat16)
    dx = _bf16_dot(gb, wb.T)
    dw = _bf16_dot(xb.reshape(-1, xb.shape[-1]).T, gb.reshape(-1, gb.shape[-1]))
    return dx, dw


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}


class MLP(nnx.Module):
    """Dense layers with `activation` (ReLU, or tanh as in yburda/iwae) between them and none after the last.

    Layers are attributes `dense0`, `dense1`, ... so that parameter paths are plain strings, which
    keeps checkpoints readable and their tree structure stable. Parameters are fp32 in both
    precisions; with dtype=bfloat16 every matmul runs through `bf16_matmul` (bf16 inputs, fp32
    accumulation) and everything between the matmuls stays fp32.
    """

    def __init__(
        self,
        sizes: list[int],
        *,
        activation: str = "relu",
        kernel_init: str = "lecun_normal",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.depth = len(sizes) - 1
        self.bf16 = dtype == jnp.bfloat16
        self.activation = activation
        # Flax's default is LeCun normal; glorot_uniform is the uniform init of Glorot & Bengio (2010) that
        # yburda/iwae (nnet.py) and Keras's Dense use. Only that one is passed, so the default draws as before.
        init = {"kernel_init": nnx.initializers.glorot_uniform()} if kernel_init == "glorot_uniform" else {}
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            layer = nnx.Linear(fan_in, fan_out, param_dtype=jnp.float32, rngs=rngs, **init)
            setattr(self, f"dense{i}", layer)

    def _dense(self, i: int, h: jax.Array) -> jax.Array:
        layer = getattr(self, f"dense{i}")
        if not self.bf16:
            return layer(h)
        return bf16_matmul(h, layer.kernel[...]) + layer.bias[...]

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h.astype(jnp.float32)
        for i in range(self.depth):
            h = self._dense(i, h)
            if i < self.depth - 1:
                h = ACTIVATIONS[self.activation](h)
        return h


class MLPNet(MLP):
    """The MLP of `spec.hidden` widths as a network of the seam (cvae_exp.models.nets, `model/net=mlp`): its
    inputs, broadcast to their common leading axes, joined into one vector in the order of `spec.inputs` (images
    flattened as they come), and a flat output of `spec.out_features`. The layers are the MLP's own attributes
    (`dense0`, ...), so parameter paths, checkpoints and `params_sha256` are those of the MLPs built before the
    seam existed."""

    def __init__(self, spec, *, rngs: nnx.Rngs):
        sizes = [sum(i.size for i in spec.inputs), *spec.hidden, spec.out_features]
        super().__init__(sizes, activation=spec.activation, kernel_init=spec.kernel_init, dtype=spec.dtype, rngs=rngs)

    def start_output_bias(self, bias: jax.Array) -> None:
        """model.output_bias=data_logit: the last layer's bias starts at `bias` [out_features]."""
        last = getattr(self, f"dense{self.depth - 1}")
        last.bias[...] = jnp.asarray(bias, last.bias[...].dtype).reshape(last.bias[...].shape)

    def __call__(self, *inputs: jax.Array) -> jax.Array:
        if len(inputs) == 1:
            return super().__call__(inputs[0])
        lead = jnp.broadcast_shapes(*(a.shape[:-1] for a in inputs))
        joined = jnp.concatenate([jnp.broadcast_to(a, (*lead, a.shape[-1])) for a in inputs], axis=-1)
        return super().__call__(joined)
