"""The likelihoods of 8-bit pixels (cvae_exp.models.pixel_likelihoods) against float64 formulas: each is a
probability of the 256 values (the masses sum to one, end bins open), stable where a naive difference of
CDFs is not, with finite gradients; the dequantized Gaussian's figure bounds the discrete log-likelihood."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cvae_exp.models.cvae import OutputHead
from cvae_exp.models.distributions import log_likelihood, mean_of
from cvae_exp.models.pixel_likelihoods import (
    HALF_BIN,
    MIN_LOG_SCALE,
    DequantizedGaussian,
    DiscretizedGaussian,
    LogisticMixture,
    head,
    head_width,
)

VALUES = np.arange(256) / 255.0  # every pixel value, as the networks see it


def mass(dist, upper, lower, loc, scale):
    """The float64 mass between the edges, from the tail the bin lies in (1 - 1e-16 minus 1 - 1e-15 is not it)."""
    above = lower > loc
    tail = dist.sf(lower, loc, scale) - dist.sf(upper, loc, scale)
    return np.where(above, tail, dist.cdf(upper, loc, scale) - dist.cdf(lower, loc, scale))


def edges(y):
    """Each value's bin in float64, the end bins open."""
    lower = np.where(y < HALF_BIN, -np.inf, y - HALF_BIN)
    upper = np.where(y > 1 - HALF_BIN, np.inf, y + HALF_BIN)
    return lower, upper


# (mean, log variance): inside, at and beyond the ends, sharp at the floor, very wide
GAUSSIANS = [(0.4, -4.0), (0.0, -9.0), (1.0, -12.0), (-0.3, -2.0), (1.7, 0.0), (0.52, 2 * MIN_LOG_SCALE), (0.5, 6.0)]


@pytest.mark.parametrize("mean, log_var", GAUSSIANS)
def test_discretized_gaussian_is_the_mass_of_each_bin_and_the_256_masses_sum_to_one(mean, log_var):
    out = DiscretizedGaussian(jnp.full(256, mean, jnp.float32), jnp.full(256, log_var, jnp.float32))
    got = np.asarray(out.log_prob(jnp.asarray(VALUES, jnp.float32)), np.float64)
    assert np.all(np.isfinite(got)) and np.all(got <= 1e-6)
    lower, upper = edges(VALUES)
    sigma = math.exp(0.5 * log_var)
    want = mass(stats.norm, upper, lower, mean, sigma)
    assert np.exp(got).sum() == pytest.approx(1.0, abs=1e-5)
    big = want > 1e-30  # where float64 still holds the mass: the same log-probability
    np.testing.assert_allclose(got[big], np.log(want[big]), rtol=2e-4, atol=2e-4)


def test_discretized_gaussian_stays_finite_in_the_far_tails_and_its_gradient_too():
    """Bins 40 standard deviations out, where Phi(b) - Phi(a) is 0 in float32 (and 1 - 1 on the other side)."""
    y = jnp.asarray([0.0, 0.5, 1.0, 3 / 255, 250 / 255], jnp.float32)

    def total(mean, log_var):
        return jnp.sum(DiscretizedGaussian(mean, log_var).log_prob(y))

    for mean in (-1.5, 0.5, 2.5):
        args = (jnp.full(5, mean, jnp.float32), jnp.full(5, -8.0, jnp.float32))
        value, grads = jax.value_and_grad(total, argnums=(0, 1))(*args)
        assert np.isfinite(float(value)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads), mean
    far = DiscretizedGaussian(jnp.asarray([0.9]), jnp.asarray([-10.0])).log_prob(jnp.asarray([77 / 255]))
    sigma = math.exp(-5.0)
    want = stats.norm.logcdf((77.5 / 255 - 0.9) / sigma)  # 89 sigmas out: the bin's top edge holds its mass
    assert float(far[0]) == pytest.approx(want, rel=1e-3)


def mixture(rng, pixels: int, channels: int, k: int, scale=(-4.0, -1.0)) -> LogisticMixture:
    pairs = channels * (channels - 1) // 2
    return LogisticMixture(
        logits=jnp.asarray(rng.normal(size=(pixels, k)), jnp.float32),
        means=jnp.asarray(rng.uniform(-0.2, 1.2, (pixels, channels, k)), jnp.float32),
        log_scales=jnp.asarray(rng.uniform(*scale, (pixels, channels, k)), jnp.float32),
        coeffs=jnp.asarray(rng.uniform(-1, 1, (pixels, pairs, k)), jnp.float32),
    )


def logistic_mass(y, mean, log_scale):
    lower, upper = edges(y)
    return mass(stats.logistic, upper, lower, mean, math.exp(log_scale))


def test_one_logistic_is_the_mass_of_each_bin_and_sums_to_one():
    rng = np.random.default_rng(0)
    for log_scale in (-7.5, -4.0, -1.0, 1.0):
        out = mixture(rng, 1, 1, 1)._replace(log_scales=jnp.full((1, 1, 1), log_scale, jnp.float32))
        got = np.array([float(out.log_prob(jnp.asarray([v], jnp.float32))[0]) for v in VALUES])
        want = logistic_mass(VALUES, float(out.means[0, 0, 0]), log_scale)
        assert np.exp(got).sum() == pytest.approx(1.0, abs=1e-5)
        big = want > 1e-30
        np.testing.assert_allclose(got[big], np.log(want[big]), rtol=2e-4, atol=2e-4)


def test_a_two_channel_mixture_is_a_joint_probability_with_coupled_means():
    """All 256 x 256 values of one pixel: the masses sum to one, and each is the mixture of products whose
    second channel's mean moves by coeff x the first channel's value."""
    rng = np.random.default_rng(1)
    out = mixture(rng, 1, 2, 3)
    grid = np.array(list(itertools.product(VALUES, VALUES)), np.float32)  # [65536, 2]: (y0, y1)
    batched = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(grid), *a.shape)), out)
    got = np.asarray(batched.log_prob(jnp.asarray(grid))[:, 0], np.float64)
    assert np.exp(got).sum() == pytest.approx(1.0, abs=1e-4)
    weights = np.asarray(jax.nn.softmax(out.logits[0]), np.float64)
    means, scales, coeffs = (np.asarray(a[0], np.float64) for a in (out.means, out.log_scales, out.coeffs))
    for y0, y1 in [(0.0, 1.0), (128 / 255, 51 / 255), (200 / 255, 3 / 255)]:
        want = sum(
            weights[k]
            * logistic_mass(np.array([y0]), means[0, k], scales[0, k])[0]
            * logistic_mass(np.array([y1]), means[1, k] + coeffs[0, k] * y0, scales[1, k])[0]
            for k in range(3)
        )
        i = int(round(y0 * 255)) * 256 + int(round(y1 * 255))
        assert got[i] == pytest.approx(math.log(want), rel=1e-4, abs=1e-4)


def test_the_mixture_head_scores_pixels_where_the_mask_scores_their_channels():
    rng = np.random.default_rng(2)
    pixels, channels, k = 6, 3, 4
    width = head_width("discretized_logistic", pixels * channels, channels, k)
    assert width == pixels * k * (1 + 2 * 3 + 3)  # PixelCNN++'s 10 parameters per component of an RGB pixel
    out = head("discretized_logistic", jnp.asarray(rng.normal(size=(2, width)), jnp.float32), channels, k)
    assert out.logits.shape == (2, pixels, k) and out.means.shape == (2, pixels, channels, k)
    y = jnp.asarray(rng.integers(0, 256, (2, pixels * channels)) / 255.0, jnp.float32)
    mask = np.zeros((2, pixels, channels), np.float32)
    mask[:, :2] = 1.0  # the first two pixels, all their channels
    got = log_likelihood(y, out, jnp.asarray(mask.reshape(2, -1)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(out.log_prob(y))[:, :2].sum(-1), rtol=1e-6)
    means = np.asarray(mean_of(out))
    assert means.shape == (2, pixels * channels) and means.min() >= 0 and means.max() <= 1


def test_the_dequantized_gaussian_bounds_the_discrete_log_likelihood():
    """Its figure, E_u[log p((k + u) / 256)] - log 256 (bins of width one), is below log P(k), the Gaussian's
    mass on [k / 256, (k + 1) / 256]; the head floors the variance and returns this distribution."""
    mean, log_var = 0.43, -5.0
    sigma = math.exp(0.5 * log_var)
    out = DequantizedGaussian(jnp.asarray([mean]), jnp.asarray([log_var]))
    u = (np.arange(2000) + 0.5) / 2000  # the expectation over u, by the midpoint rule
    for k in (0, 90, 110, 255):
        y = jnp.asarray((k + u) / 256.0, jnp.float32)[:, None]
        bound = float(jnp.mean(out.log_prob(y)))
        exact = math.log(stats.norm.cdf((k + 1) / 256, mean, sigma) - stats.norm.cdf(k / 256, mean, sigma))
        assert bound <= exact + 1e-4 and bound == pytest.approx(exact, abs=0.05), k
    gaussian = OutputHead("gaussian", min_log_var=-6.0)(jnp.zeros((1, 4)))
    assert isinstance(gaussian, DequantizedGaussian) and np.all(np.asarray(gaussian.log_var) >= -6.0)
