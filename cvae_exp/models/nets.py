"""The one seam every network goes through: the contract of a network (`NetSpec`) and the factory that builds
the network of each role from the `model.net` config (`NetFactory`).

A model has up to four networks, its *roles*: the recognition network q(z | x, y), the prior p(z | x), the
generation network p(y | x, z) and the deterministic baseline y_hat = f(x) (also the training aid inside a
CVAE). Each is built as `target(spec, **keys, rngs=rngs)`, where `target` is `model.net._target_` (or the
role's own `model.net.<role>._target_`), `keys` the other keys of that node, and `spec` a `NetSpec`:

- **inputs**, in the order of `spec.inputs`, each a flat array `[..., size]`: the condition `x` (a one-hot
  label, nothing, or, for the quadrant task, the image with unobserved pixels set to -1), the output `y`, the
  baseline's prediction `y_hat`, the latent `z`. `Input.image` says which are images of the data's geometry:
  `a.reshape(*a.shape[:-1], *spec.geometry.shape)` is `[..., height, width, channels]`, channels last.
- **leading axes**: every input has the batch axis [B]; `z` may carry more in front (the importance-sampled
  estimator passes z as [S, B, L]), the other inputs then broadcast against it (`spec.lead(*inputs)`).
- **output**, with those broadcast leading axes: `[..., out_features]` (recognition and prior: a Gaussian's
  mean and log-variance, halves of the last axis; generation and baseline: the likelihood head's input in its
  own layout, `cvae_exp.models.cvae.OutputHead`) or, for generation and baseline, an image
  `[..., height, width, out_channels]`, which the head turns into its layout.
- **options** of the model every network may honour: `spec.activation` and `spec.kernel_init`
  (model.activation, model.kernel_init); with `spec.output_bias` (model.output_bias=data_logit, generation and
  baseline) the network needs a method `start_output_bias(bias)`, `bias` the [out_features] logits of the
  training data's mean pixel, which sets the bias its output starts from.
- `__call__` must be pure (no state changes): the steps merge the parameters back inside jit and vmap.
  Per-example: an output may depend on its own example only (no batch statistics, no mixing across the
  batch): evaluations pad batches and vmapped seeds must not see each other.

A network that is not part of cvae_exp (`model.net._target_=mypkg.nets.MyNet`) is built only when the command
names its package as trusted (`trust_modules=[mypkg]`, cvae_exp.config.check_targets); docs/extending.md has a
worked example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from cvae_exp.data.geometry import Geometry
from cvae_exp.errors import UserError

ROLES = ("recognition", "prior", "generation", "baseline")


@dataclass(frozen=True)
class Input:
    name: str  # x (the condition), y (the output), y_hat (the baseline's prediction), z (the latent)
    size: int  # flat dimensions (0: an empty condition, the VAE's)
    image: bool  # an image of the data's geometry, flattened channels last


@dataclass(frozen=True)
class NetSpec:
    """What a network of one role takes and returns (the contract above)."""

    role: str  # recognition | prior | generation | baseline
    inputs: tuple[Input, ...]  # what __call__ receives, in this order
    out_features: int  # the width of a flat output
    out_channels: int | None  # generation and baseline: channels per pixel of an image output; else None
    geometry: Geometry  # the data's: height, width, channels (and classes)
    hidden: tuple[int, ...] = ()  # model.hidden (model.baseline_hidden for the aid's baseline): dense widths
    dtype: Any = jnp.float32  # the matmul and convolution inputs' type (bfloat16 with trainer.precision=bf16)
    activation: str = "relu"  # model.activation: relu | tanh, between the layers
    kernel_init: str = "lecun_normal"  # model.kernel_init: lecun_normal (Flax's default) | glorot_uniform
    # model.output_bias=data_logit, generation and baseline: the output starts from a bias per output value,
    # which `start_output_bias(bias [out_features])` sets once the network is built
    output_bias: bool = False

    def lead(self, *inputs: jax.Array) -> tuple[int, ...]:
        """The leading axes of the output: those of the inputs, broadcast (z's sample axes in front)."""
        return jnp.broadcast_shapes(*(a.shape[:-1] for a in inputs))

    def as_image(self, a: jax.Array) -> jax.Array:
        """A flat image input [..., dims] as [..., height, width, channels]."""
        return a.reshape(*a.shape[:-1], *self.geometry.shape)


class NetFactory:
    """Builds the network of each role from the `model.net` node (a plain dict), for images of `geometry`.

    The node's `_target_` builds every role; a role's own node (`model.net.generation`, ...) with its own
    `_target_` and keys builds that role instead. One `rngs` for all, drawn in the order the model asks.
    """

    def __init__(
        self,
        net: dict,
        geometry: Geometry,
        *,
        hidden,
        dtype,
        rngs,
        activation: str = "relu",
        kernel_init: str = "lecun_normal",
        output_bias: bool = False,
    ):
        self.net, self.geometry = dict(net), geometry
        self.hidden, self.dtype, self.rngs = tuple(hidden), dtype, rngs
        self.activation, self.kernel_init, self.output_bias = activation, kernel_init, output_bias

    def node(self, role: str) -> tuple[str, dict]:
        """(where it sits in the config, the node) that builds `role`."""
        own = self.net.get(role)
        if isinstance(own, dict):
            return f"model.net.{role}", own
        return "model.net", {k: v for k, v in self.net.items() if k not in ROLES}

    def spec(
        self,
        role: str,
        inputs: tuple[Input, ...],
        out_features: int,
        out_channels: int | None = None,
        hidden: list[int] | None = None,
    ) -> NetSpec:
        """The contract of the `role` network with these inputs and outputs (`hidden`: the model's widths)."""
        widths = tuple(self.hidden if hidden is None else hidden)
        return NetSpec(
            role,
            tuple(inputs),
            out_features,
            out_channels,
            self.geometry,
            widths,
            self.dtype,
            self.activation,
            self.kernel_init,
            self.output_bias and role in ("generation", "baseline"),
        )

    def build(self, spec: NetSpec):
        """The network of `spec.role`, as its node in `model.net` describes it."""
        where, node = self.node(spec.role)
        try:
            return instantiate(node, spec, rngs=self.rngs, _convert_="all")
        except InstantiationException as err:
            cause = err.__cause__ or err
            text = str(cause).strip().splitlines()
            raise UserError(
                f"{where}._target_={node.get('_target_')} could not build the {spec.role} network "
                f"({type(cause).__name__}: {text[0] if text else ''})."
            ) from None


def to_flat(out: jax.Array, spec: NetSpec, lead: tuple[int, ...], from_image) -> jax.Array:
    """A generation or baseline network's output as the head's flat input: `[..., out_features]` as it is, or
    an image `[..., height, width, out_channels]` through `from_image` (the head's layout); anything else
    is refused, naming the role and the shapes."""
    if out.shape == (*lead, spec.out_features):
        return out
    if spec.out_channels is not None and out.shape == (*lead, *spec.geometry.shape[:2], spec.out_channels):
        return from_image(out)
    image = f" or {(*lead, *spec.geometry.shape[:2], spec.out_channels)}" if spec.out_channels else ""
    raise UserError(
        f"The {spec.role} network returned an array of shape {tuple(out.shape)}, but its output must have "
        f"shape {(*lead, spec.out_features)}{image} (see docs/extending.md)."
    )


def check_gaussian(out: jax.Array, spec: NetSpec, lead: tuple[int, ...]) -> jax.Array:
    """A recognition or prior network's output [..., 2 L], refused in one sentence when its shape is not."""
    if out.shape != (*lead, spec.out_features):
        raise UserError(
            f"The {spec.role} network returned an array of shape {tuple(out.shape)}, but its output must have "
            f"shape {(*lead, spec.out_features)}: a Gaussian's mean and log-variance (see docs/extending.md)."
        )
    return out


def mlp_nets(hidden, y_dim: int, *, seed: int = 0, activation: str = "relu", kernel_init: str = "lecun_normal"):
    """The factory of the default MLPs (`model/net=mlp`) of `hidden` widths, for flat outputs of `y_dim` values
    (one row of pixels): for building a `CVAE` or `Baseline` directly, without a config (tests, notebooks)."""
    from flax import nnx

    net = {"_target_": "cvae_exp.models.mlp.MLPNet"}
    geometry = Geometry(1, y_dim, 1, 0)
    return NetFactory(
        net,
        geometry,
        hidden=hidden,
        dtype=jnp.float32,
        rngs=nnx.Rngs(seed),
        activation=activation,
        kernel_init=kernel_init,
    )
