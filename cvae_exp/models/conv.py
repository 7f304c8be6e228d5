"""The convolutional network of every role (`model/net=conv`): a conventional encoder, dense bottleneck and
decoder, sized in the config and from the data's geometry.

- **Encoder** (every role with an image input: y, the quadrant task's condition x, the baseline's y_hat): the
  images joined as channels go down through one convolution of stride 2 per entry of `channels` (SAME
  padding, so an odd size rounds up: 28 -> 14 -> 7, 20 x 36 -> 10 x 18 -> 5 x 9), each followed by the
  activation and `blocks` residual blocks; the last feature map is flattened.
- **Bottleneck**: the flattened features joined with the vector inputs (a one-hot label, z), then the
  layers of `dense`, each followed by the activation. A class label can instead join the encoder's input as constant channels
  (`label=channels`); a network without an image input always takes it here.
- **Outputs**: recognition and prior, a dense layer to the Gaussian's mean and log-variance. Generation and
  baseline, an image: a dense layer to the bottleneck's feature map, then per level `blocks` residual blocks
  and an upsampling by two (cropped to the encoder's size at that level), up to the data's height and width.
  Before the last upsampling the condition's images join again (space-to-depth: each 2 x 2 block of pixels as
  channels), so the given pixels reach the output directly. With model.output_bias=data_logit the image
  output has a bias per pixel and channel (`out_bias`), which starts at the data's logits. Upsampling is a sub-pixel convolution (Shi et
  al. 2016): a stride-1 convolution to four times the channels, then depth-to-space, which computes the same
  family of functions as a transposed convolution of stride 2 but is a plain convolution: on the
  development CPU its forward and backward pass at batch 128 took 12 ms against 68 ms for nnx.ConvTranspose
  (14 x 14 -> 28 x 28, 16 channels).
- **The model's options**: the activation is model.activation (ReLU or tanh) everywhere; with
  model.kernel_init=glorot_uniform every convolution and dense kernel starts from Glorot's uniform init.
- **Normalisation** (`norm`): none, `group` (GroupNorm, 8 groups or fewer) or `layer` (GroupNorm with one
  group: every channel and position of one example). Both use the statistics of each example alone, so an
  output never depends on the rest of its batch (no batch statistics: evaluations pad their batches, and
  vmapped seeds and members must not see each other).

Internally every array has one batch axis: the leading axes of the inputs (z's sample axes [S, B] included)
are flattened into it and restored at the end, and what depends only on the condition (its encoding) is
computed once per example, not once per sample.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cvae_exp.models.mlp import ACTIVATIONS, bf16_matmul

NORMS = ("none", "group", "layer")
LABELS = ("bottleneck", "channels")


def depth_to_space(h: jax.Array) -> jax.Array:
    """[N, H, W, 4 C] -> [N, 2 H, 2 W, C]: channel block (i, j) of a position becomes its pixel (i, j)."""
    n, height, width, c4 = h.shape
    c = c4 // 4
    return h.reshape(n, height, width, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * height, 2 * width, c)


def space_to_depth(h: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[N, H, W, C] -> [N, h, w, 4 C] with (h, w) = `size`, the image first padded with zeros to 2h x 2w."""
    n, height, width, c = h.shape
    th, tw = size
    h = jnp.pad(h, ((0, 0), (0, 2 * th - height), (0, 2 * tw - width), (0, 0)))
    return h.reshape(n, th, 2, tw, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, th, tw, 4 * c)


def level_sizes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """The feature maps' sizes: the image's, then each halved and rounded up (SAME padding, stride 2)."""
    sizes = [(height, width)]
    for _ in range(levels):
        h, w = sizes[-1]
        sizes.append((-(-h // 2), -(-w // 2)))
    return sizes


class Norm(nnx.Module):
    """Per-example normalisation of [N, H, W, C] maps: GroupNorm over each example's positions and a group of
    its channels (one group for `layer`), or nothing."""

    def __init__(self, kind: str, channels: int, *, rngs: nnx.Rngs):
        self.kind = kind
        groups = 1 if kind == "layer" else math.gcd(channels, 8)
        self.norm = nnx.GroupNorm(channels, num_groups=groups, rngs=rngs) if kind != "none" else None

    def __call__(self, h: jax.Array) -> jax.Array:
        return h if self.norm is None else self.norm(h)  # [N, H, W, C]: statistics over all axes but N


def _conv_args(dtype) -> dict:
    """bf16: the inputs and kernel as bfloat16, accumulated and returned as float32; fp32: as Flax does."""
    if dtype == jnp.bfloat16:
        return {"dtype": jnp.bfloat16, "preferred_element_type": jnp.float32}
    return {}


def _init_args(kernel_init: str) -> dict:
    """model.kernel_init=glorot_uniform for a convolution or dense layer; lecun_normal: Flax's own default."""
    return {"kernel_init": nnx.initializers.glorot_uniform()} if kernel_init == "glorot_uniform" else {}


class ResBlock(nnx.Module):
    """h + conv(act(norm(conv(act(norm(h)))))), the pre-activation residual block, channels kept."""

    def __init__(self, channels: int, kernel: int, norm: str, spec, *, rngs: nnx.Rngs):
        conv = dict(kernel_size=(kernel, kernel), param_dtype=jnp.float32, rngs=rngs, **_conv_args(spec.dtype))
        conv.update(_init_args(spec.kernel_init))
        self.activation = spec.activation
        self.norm0, self.conv0 = Norm(norm, channels, rngs=rngs), nnx.Conv(channels, channels, **conv)
        self.norm1, self.conv1 = Norm(norm, channels, rngs=rngs), nnx.Conv(channels, channels, **conv)

    def __call__(self, h: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        r = self.conv0(act(self.norm0(h))).astype(jnp.float32)
        return h + self.conv1(act(self.norm1(r))).astype(jnp.float32)


class ConvNet(nnx.Module):
    """The convolutional network of one role (module docstring), built from its `spec`
    (cvae_exp.models.nets.NetSpec) and the keys of `model/net=conv`."""

    def __init__(
        self,
        spec,
        *,
        channels: list[int] = (32, 64),
        kernel: int = 3,
        blocks: int = 0,
        norm: str = "none",
        dense: list[int] = (256,),
        label: str = "bottleneck",
        rngs: nnx.Rngs,
    ):
        geometry = spec.geometry
        self.spec, self.blocks, self.norm_kind = spec, blocks, norm
        self.channels = tuple(channels)
        self.sizes = tuple(level_sizes(geometry.height, geometry.width, len(channels)))
        self.bf16 = spec.dtype == jnp.bfloat16
        self.activation = spec.activation
        images = [i for i in spec.inputs if i.image and i.size]
        vectors = [i for i in spec.inputs if not i.image and i.size]
        # A class label as constant channels of the encoder's input (label=channels), when there is an encoder.
        self.label_channels = label == "channels" and bool(images)
        as_channels = [i for i in vectors if i.name != "z"] if self.label_channels else []
        self.image_names = tuple(i.name for i in images)
        self.channel_names = tuple(i.name for i in as_channels)
        self.vector_names = tuple(i.name for i in vectors if i not in as_channels)
        conv = dict(param_dtype=jnp.float32, rngs=rngs, **_conv_args(spec.dtype), **_init_args(spec.kernel_init))
        linear = dict(param_dtype=jnp.float32, rngs=rngs, **_init_args(spec.kernel_init))
        k = (kernel, kernel)
        # encoder
        c_in = geometry.channels * len(images) + sum(i.size for i in as_channels)
        self.encoded = 0
        if images:
            for level, c in enumerate(channels):
                setattr(self, f"down{level}", nnx.Conv(c_in, c, k, strides=2, **conv))
                setattr(self, f"down_norm{level}", Norm(norm, c, rngs=rngs))
                for b in range(blocks):
                    setattr(self, f"down{level}_block{b}", ResBlock(c, kernel, norm, spec, rngs=rngs))
                c_in = c
            h, w = self.sizes[-1]
            self.encoded = h * w * channels[-1]
        # bottleneck
        width = self.encoded + sum(i.size for i in vectors if i.name in self.vector_names)
        for i, d in enumerate(dense):
            setattr(self, f"dense{i}", nnx.Linear(width, d, **linear))
            width = d
        self.depth = len(dense)
        # outputs
        self.image_out = spec.out_channels is not None
        if not self.image_out:
            self.out = nnx.Linear(width, spec.out_features, **linear)
            return
        h, w = self.sizes[-1]
        self.to_map = nnx.Linear(width, h * w * channels[-1], **linear)
        for level in reversed(range(1, len(channels) + 1)):  # the map of level (its size: sizes[level])
            c = channels[level - 1]
            for b in range(blocks):
                setattr(self, f"up{level}_block{b}", ResBlock(c, kernel, norm, spec, rngs=rngs))
            if level > 1:  # up to level - 1, sub-pixel: 4 x the channels, then depth-to-space
                setattr(self, f"up{level - 1}", nnx.Conv(c, 4 * channels[level - 2], k, **conv))
                setattr(self, f"up_norm{level - 1}", Norm(norm, channels[level - 2], rngs=rngs))
        skip = geometry.channels * sum(1 for i in images if i.name != "y")  # the condition's images, not y
        self.last = nnx.Conv(channels[0] + 4 * skip, 4 * spec.out_channels, k, **conv)
        # model.output_bias=data_logit: a bias per output pixel and channel (start_output_bias sets it)
        shape = (geometry.height, geometry.width, spec.out_channels)
        self.out_bias = nnx.Param(jnp.zeros(shape, jnp.float32)) if spec.output_bias else None

    def start_output_bias(self, bias: jax.Array) -> None:
        """model.output_bias=data_logit: the image output's per-pixel bias starts at `bias` [out_features]."""
        if getattr(self, "out_bias", None) is None:
            raise ValueError("start_output_bias needs a network built with spec.output_bias (generation, baseline)")
        self.out_bias[...] = jnp.asarray(bias, jnp.float32).reshape(self.out_bias[...].shape)

    # ------------------------------------------------------------------ pieces

    def _dense(self, layer: nnx.Linear, h: jax.Array) -> jax.Array:
        if not self.bf16:
            return layer(h)
        return bf16_matmul(h, layer.kernel[...]) + layer.bias[...]

    def _encode(self, image: jax.Array) -> jax.Array:
        """[N, H, W, C] -> [N, features]."""
        h = image
        for level in range(len(self.channels)):
            h = getattr(self, f"down{level}")(h).astype(jnp.float32)
            h = ACTIVATIONS[self.activation](getattr(self, f"down_norm{level}")(h))
            for b in range(self.blocks):
                h = getattr(self, f"down{level}_block{b}")(h)
        return h.reshape(h.shape[0], -1)

    def _decode(self, h: jax.Array, skip: jax.Array | None) -> jax.Array:
        """[N, width] -> [N, H, W, out_channels], with the condition's images `skip` [N, H, W, c] joined before
        the last upsampling."""
        levels = len(self.channels)
        mh, mw = self.sizes[-1]
        act = ACTIVATIONS[self.activation]
        h = act(self._dense(self.to_map, h)).reshape(h.shape[0], mh, mw, self.channels[-1])
        for level in reversed(range(1, levels + 1)):
            for b in range(self.blocks):
                h = getattr(self, f"up{level}_block{b}")(h)
            if level > 1:
                th, tw = self.sizes[level - 1]
                h = depth_to_space(getattr(self, f"up{level - 1}")(h).astype(jnp.float32))[:, :th, :tw, :]
                h = act(getattr(self, f"up_norm{level - 1}")(h))
        if skip is not None:
            h = jnp.concatenate([h, space_to_depth(skip, self.sizes[1])], axis=-1)
        th, tw = self.sizes[0]
        out = depth_to_space(self.last(h).astype(jnp.float32))[:, :th, :tw, :]
        return out if self.out_bias is None else out + self.out_bias[...]

    # ------------------------------------------------------------------ the network

    def __call__(self, *inputs: jax.Array) -> jax.Array:
        spec = self.spec
        named = {i.name: a.astype(jnp.float32) for i, a in zip(spec.inputs, inputs, strict=True) if i.size}
        lead = spec.lead(*inputs)
        parts = []  # the bottleneck's inputs, each [*lead, d]
        images = [spec.as_image(named[n]) for n in self.image_names]
        if images:
            # The images depend on the condition and y only, never on z: encoded at their own leading axes.
            img_lead = jnp.broadcast_shapes(*(a.shape[:-3] for a in images))
            joined = [jnp.broadcast_to(a, (*img_lead, *a.shape[-3:])) for a in images]
            for n in self.channel_names:  # a label as constant channels
                v = jnp.broadcast_to(named[n], (*img_lead, named[n].shape[-1]))
                joined.append(
                    jnp.broadcast_to(v[..., None, None, :], (*img_lead, *images[0].shape[-3:-1], v.shape[-1]))
                )
            x = jnp.concatenate(joined, axis=-1)
            feats = self._encode(x.reshape(-1, *x.shape[-3:])).reshape(*img_lead, self.encoded)
            parts.append(feats)
        parts += [named[n] for n in self.vector_names]
        h = jnp.concatenate([jnp.broadcast_to(p, (*lead, p.shape[-1])) for p in parts], axis=-1)
        h = h.reshape(-1, h.shape[-1])
        for i in range(self.depth):
            h = ACTIVATIONS[self.activation](self._dense(getattr(self, f"dense{i}"), h))
        if not self.image_out:
            return self._dense(self.out, h).reshape(*lead, -1)
        cond = [spec.as_image(named[n]) for n in self.image_names if n != "y"]
        skip = None
        if cond:
            skip = jnp.concatenate([jnp.broadcast_to(a, (*lead, *a.shape[-3:])) for a in cond], axis=-1)
            skip = skip.reshape(-1, *skip.shape[-3:])
        out = self._decode(h, skip)
        return out.reshape(*lead, *out.shape[1:])
