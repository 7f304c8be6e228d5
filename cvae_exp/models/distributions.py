"""Diagonal Gaussians and the output likelihoods: the probability that both the models and the objectives
are built from (below both, so neither reaches into the other).

Log-variances are used throughout instead of variances: sigma^2 = exp(log_var) keeps the parameters
unconstrained and the arithmetic stable. Every function works on a batch and sums over the last axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cvae_exp.models.pixel_likelihoods import EIGHT_BIT, log_prob_sum

LOG_2PI = math.log(2.0 * math.pi)

Gaussian = tuple[jax.Array, jax.Array]  # (mean, log-variance), diagonal
# Bernoulli: (logits, None); a Gaussian density: (mean, log-variance); the likelihoods of 8-bit pixels: a
# NamedTuple of cvae_exp.models.pixel_likelihoods (DiscretizedGaussian, LogisticMixture, DequantizedGaussian)
Output = tuple


def reparameterize(key: jax.Array, dist: Gaussian) -> jax.Array:
    """z = mean + sigma * eps with eps ~ N(0, I): a sample that gradients flow through."""
    mean, log_var = dist
    return mean + jnp.exp(0.5 * log_var) * jax.random.normal(key, mean.shape, mean.dtype)


def kl_diag_gaussians(q: Gaussian, p: Gaussian) -> jax.Array:
    """KL(q || p) for diagonal Gaussians, in closed form, summed over the last axis.

    KL = 1/2 sum( log s_p^2 - log s_q^2 - 1 + (s_q^2 + (m_q - m_p)^2) / s_p^2 ).
    With p = N(0, I) this is the VAE's -1/2 sum(1 + log s_q^2 - m_q^2 - s_q^2).
    """
    (mq, lq), (mp, lp) = q, p
    return 0.5 * jnp.sum(lp - lq - 1.0 + (jnp.exp(lq) + jnp.square(mq - mp)) * jnp.exp(-lp), axis=-1)


def gaussian_log_prob(value: jax.Array, dist: Gaussian) -> jax.Array:
    """log N(value; mean, diag(exp(log_var))), summed over the last axis."""
    mean, log_var = dist
    return -0.5 * jnp.sum(LOG_2PI + log_var + jnp.square(value - mean) * jnp.exp(-log_var), axis=-1)


def log_likelihood(y: jax.Array, out: Output, mask: jax.Array) -> jax.Array:
    """log p(y | ...) summed over the scored pixels (mask = 1).

    Bernoulli in logits l: y log sigmoid(l) + (1 - y) log sigmoid(-l) = y l - softplus(l); for
    grayscale y in [0, 1] this is the negative binary cross-entropy. A (mean, log-variance) pair: the diagonal
    Gaussian density. The likelihoods of 8-bit pixels (discretized Gaussian, logistic mixture, dequantized
    Gaussian) score themselves (`cvae_exp.models.pixel_likelihoods`).
    """
    if isinstance(out, EIGHT_BIT):
        return log_prob_sum(y, out, mask)
    loc, log_var = out
    if log_var is None:
        per_pixel = y * loc - jax.nn.softplus(loc)
    else:
        per_pixel = -0.5 * (LOG_2PI + log_var + jnp.square(y - loc) * jnp.exp(-log_var))
    return jnp.sum(per_pixel * mask, axis=-1)


def mean_of(out: Output) -> jax.Array:
    """The mean of p(y | ...) per dimension, what the drawings show (and an aided model's y_hat)."""
    if isinstance(out, EIGHT_BIT):
        return out.mean_value()
    loc, log_var = out
    return jax.nn.sigmoid(loc) if log_var is None else loc
