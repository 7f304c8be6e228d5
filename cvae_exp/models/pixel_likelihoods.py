"""Likelihoods of 8-bit pixels: probabilities of the 256 values a pixel can take, so that what a model
reports is a log-likelihood of the data (and bits per dimension compare with the literature).

Pixel value k in 0..255 is y = k / 255 in [0, 1], what the networks see; bin k is [y - d, y + d] with the
half-width d = 1 / 510, and the end bins are open (k = 0 takes everything below d, k = 255 everything above
1 - d), so the 256 masses sum to one. Three output distributions, each a NamedTuple of the head's
parameters with `log_prob(y)` (per dimension or per pixel) and `mean_value()` (what the drawings show):

- `DiscretizedGaussian`: a Gaussian's mass on the bin, mean and learned variance per dimension;
- `LogisticMixture`: the discretized mixture of logistics of PixelCNN++ (Salimans et al. 2017) and VDVAE
  (Child 2021): per pixel, K components shared by its channels, each channel's mean shifted linearly by the
  values of the channels before it;
- `DequantizedGaussian`: the continuous Gaussian on y = (k + u) / 256, u uniform in [0, 1) (the data's
  dequantization, `cvae_exp.data.pipeline.prepare_arrays`): its log-density on the scale where bins have
  width one, log p(y) - log 256, whose expectation over u bounds log P(k) from below (docs/math.md).

docs/math.md derives each; tests/test_pixel_likelihoods.py checks them (the 256 masses sum to one).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

LOG_2PI = math.log(2.0 * math.pi)
HALF_BIN = 0.5 / 255.0  # d: half the distance between two pixel values on the [0, 1] scale
# The smallest log scale (sigma, or the logistic's s) of the discretized likelihoods: PixelCNN++'s floor of -7
# on its [-1, 1] scale, on our [0, 1] scale. Their probabilities are bounded by one, so the floor only keeps the
# arithmetic finite; at the floor a bin holds 8.5 standard deviations.
MIN_LOG_SCALE = -7.0 - math.log(2.0)
LIKELIHOODS = ("discretized_gaussian", "discretized_logistic")  # the heads built here (and `gaussian`)


def bin_edges(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The edges (k - 1/2) / 255 and (k + 1/2) / 255 of the bin of y = k / 255, each computed from the integer
    k + 1/2 alike, so that one bin's upper edge is its neighbour's lower edge to the bit and the masses of
    neighbouring bins telescope (in float32, y + d and the next y - d differ by rounding)."""
    k = jnp.round(y * 255.0)
    return (k - 0.5) / 255.0, (k + 0.5) / 255.0


class DiscretizedGaussian(NamedTuple):
    """N(mean, exp(log_var)) integrated over each pixel value's bin, per dimension."""

    mean: jax.Array  # [..., D], unconstrained (the end bins take what lies beyond 0 and 1)
    log_var: jax.Array  # [..., D]

    def log_prob(self, y: jax.Array) -> jax.Array:
        """log P(k) per dimension [..., D] for y = k / 255."""
        inv = jnp.exp(-0.5 * self.log_var)
        lower, upper = bin_edges(y)
        a = (lower - self.mean) * inv  # the bin's edges in standard units
        b = (upper - self.mean) * inv
        middle = _log_normal_mass(a, b, 2.0 * HALF_BIN * inv)
        return jnp.where(y < HALF_BIN, log_ndtr(b), jnp.where(y > 1.0 - HALF_BIN, log_ndtr(-a), middle))

    def mean_value(self) -> jax.Array:
        return jnp.clip(self.mean, 0.0, 1.0)


def _log_normal_mass(a: jax.Array, b: jax.Array, width: jax.Array) -> jax.Array:
    """log(Phi(b) - Phi(a)) for a < b, b - a = `width`: from the tail the bin lies in (no difference of two
    numbers near one), and where the bin holds less than 1/1000 of that tail, the midpoint rule
    log(phi((a + b) / 2) (b - a)), which is then exact to float precision (and never takes log 0)."""
    upper = a > 0.0
    hi = jnp.where(upper, log_ndtr(-a), log_ndtr(b))  # log of the larger tail mass
    lo = jnp.where(upper, log_ndtr(-b), log_ndtr(a))
    gap = lo - hi  # log(smaller / larger) < 0
    wide = gap < -1e-3
    exact = hi + jnp.log(-jnp.expm1(jnp.where(wide, gap, -1.0)))  # safe input where unused: no NaN gradient
    mid = 0.5 * (a + b)
    midpoint = -0.5 * (LOG_2PI + jnp.square(mid)) + jnp.log(width)
    return jnp.where(wide, exact, midpoint)


class DequantizedGaussian(NamedTuple):
    """The continuous Gaussian on dequantized pixels y = (k + u) / 256: log-density with bins of width one."""

    mean: jax.Array  # [..., D] in (0, 1)
    log_var: jax.Array  # [..., D], floored by model.min_log_var

    def log_prob(self, y: jax.Array) -> jax.Array:
        density = -0.5 * (LOG_2PI + self.log_var + jnp.square(y - self.mean) * jnp.exp(-self.log_var))
        return density - math.log(256.0)

    def mean_value(self) -> jax.Array:
        return self.mean


class LogisticMixture(NamedTuple):
    """K discretized logistics per pixel, shared by its C channels (PixelCNN++'s mixture)."""

    logits: jax.Array  # [..., P, K] mixture weights (P = height x width)
    means: jax.Array  # [..., P, C, K]
    log_scales: jax.Array  # [..., P, C, K], floored at MIN_LOG_SCALE
    coeffs: jax.Array  # [..., P, C (C - 1) / 2, K] in (-1, 1): channel c's mean += coeff(c, j) * y_j, j < c

    def _coupled(self, values: jax.Array) -> jax.Array:
        """The means [..., P, C, K] with each channel's shifted by the `values` [..., P, C, K or 1] of the
        channels before it."""
        channels = self.means.shape[-2]
        means = [self.means[..., 0, :]]
        for c in range(1, channels):
            shift = sum(self.coeffs[..., _pair(c, j), :] * values[..., j, :] for j in range(c))
            means.append(self.means[..., c, :] + shift)
        return jnp.stack(means, axis=-2)

    def log_prob(self, y: jax.Array) -> jax.Array:
        """log P(pixel) per pixel [..., P], its channels jointly, for y [..., P * C] = k / 255."""
        pixels, channels = self.means.shape[-3], self.means.shape[-2]
        yc = y.reshape(*y.shape[:-1], pixels, channels)[..., None]  # [..., P, C, 1]
        means = self._coupled(yc)
        inv = jnp.exp(-self.log_scales)
        lower, upper = bin_edges(yc)
        a, b = (lower - means) * inv, (upper - means) * inv
        log_below_b = -jax.nn.softplus(-b)  # log sigmoid(b): the mass below the bin's top
        log_above_a = -jax.nn.softplus(a)  # log (1 - sigmoid(a)): the mass above its bottom
        # sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - exp(a - b)), with b - a = 2 d / s exactly
        middle = log_below_b + log_above_a + jnp.log(-jnp.expm1(-2.0 * HALF_BIN * inv))
        per_channel = jnp.where(yc < HALF_BIN, log_below_b, jnp.where(yc > 1.0 - HALF_BIN, log_above_a, middle))
        return jax.nn.logsumexp(jax.nn.log_softmax(self.logits, axis=-1) + per_channel.sum(axis=-2), axis=-1)

    def mean_value(self) -> jax.Array:
        """E[y] per dimension [..., P * C] (the logistics' means, each channel's through the ones before it)."""
        means = self.means
        coupled = [means[..., 0, :]]
        for c in range(1, means.shape[-2]):
            coupled.append(means[..., c, :] + sum(self.coeffs[..., _pair(c, j), :] * coupled[j] for j in range(c)))
        weights = jax.nn.softmax(self.logits, axis=-1)[..., None, :]
        mean = jnp.sum(weights * jnp.stack(coupled, axis=-2), axis=-1)  # [..., P, C]
        return jnp.clip(mean.reshape(*mean.shape[:-2], -1), 0.0, 1.0)


def _pair(c: int, j: int) -> int:
    """The coefficient of channel j < c in channel c's mean: pairs in the order (1,0), (2,0), (2,1), ..."""
    return c * (c - 1) // 2 + j


def _per_pixel(channels: int) -> int:
    """The mixture's parameters per pixel and component: a weight, C means, C scales, C (C - 1) / 2 coefficients."""
    return 1 + 2 * channels + channels * (channels - 1) // 2


def head_width(likelihood: str, dims: int, channels: int, mixtures: int) -> int:
    """The last layer's width for a likelihood of this module on `dims` = pixels x channels dimensions."""
    if likelihood == "discretized_logistic":
        return dims // channels * mixtures * _per_pixel(channels)
    return 2 * dims


def head(likelihood: str, h: jax.Array, channels: int, mixtures: int):
    """The distribution of `likelihood` from the last layer's output h [..., head_width]."""
    if likelihood == "discretized_gaussian":
        mean, raw_log_var = jnp.split(h, 2, axis=-1)
        return DiscretizedGaussian(mean, jnp.logaddexp(raw_log_var, 2.0 * MIN_LOG_SCALE))
    per_pixel = _per_pixel(channels)
    h = h.reshape(*h.shape[:-1], -1, per_pixel, mixtures)  # [..., P, parameters, K]
    return LogisticMixture(
        logits=h[..., 0, :],
        means=h[..., 1 : 1 + channels, :],
        log_scales=jnp.logaddexp(h[..., 1 + channels : 1 + 2 * channels, :], MIN_LOG_SCALE),
        coeffs=jnp.tanh(h[..., 1 + 2 * channels :, :]),
    )


EIGHT_BIT = (DiscretizedGaussian, LogisticMixture, DequantizedGaussian)  # outputs with their own log_prob


def log_prob_sum(y: jax.Array, out, mask: jax.Array) -> jax.Array:
    """log p(y) of an EIGHT_BIT output summed over the scored dimensions (mask = 1); a mixture's pixel is scored
    where its first channel is (masks treat a pixel's channels alike)."""
    per = out.log_prob(y)
    if isinstance(out, LogisticMixture):
        mask = mask.reshape(*mask.shape[:-1], per.shape[-1], -1)[..., 0]
    return jnp.sum(per * mask, axis=-1)
