"""The conditional VAE of Sohn, Lee and Yan (2015) and the deterministic baseline.

Notation follows the paper: x is the condition, y the output, z the latent. A VAE is the same module
with an empty condition (x_dim = 0) and the fixed prior N(0, I). A CVAE built with `baseline_hidden`
holds a `Baseline` whose prediction feeds its prior network, and with `baseline_into="prior_and_generation"`
its generation network too (`model.baseline_run`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cvae_exp.models import pixel_likelihoods
from cvae_exp.models.distributions import Gaussian, Output, mean_of, reparameterize
from cvae_exp.models.mlp import MLP
from cvae_exp.models.pixel_likelihoods import DequantizedGaussian


def _split_gaussian(h: jax.Array) -> Gaussian:
    mean, log_var = jnp.split(h, 2, axis=-1)
    return mean, log_var


class OutputHead(nnx.Module):
    """Turns a network's last layer into the parameters of p(y | ...).

    Bernoulli: logits. Gaussian (the continuous density of dequantized pixels): a mean in (0, 1) and a
    learned per-pixel log-variance with a smooth floor, log_var = logaddexp(raw, min_log_var) > min_log_var,
    so constant pixels (the border of every MNIST digit) cannot drive the variance to zero and the
    likelihood to infinity. discretized_gaussian, discretized_logistic (`mixtures` components, `channels`
    per pixel): cvae_exp.models.pixel_likelihoods.
    """

    def __init__(self, likelihood: str, min_log_var: float, channels: int = 1, mixtures: int = 10):
        self.likelihood = likelihood
        self.min_log_var = min_log_var
        self.channels, self.mixtures = channels, mixtures

    def width(self, y_dim: int) -> int:
        if self.likelihood in pixel_likelihoods.LIKELIHOODS:
            return pixel_likelihoods.head_width(self.likelihood, y_dim, self.channels, self.mixtures)
        return y_dim if self.likelihood == "bernoulli" else 2 * y_dim

    def __call__(self, h: jax.Array) -> Output:
        if self.likelihood == "bernoulli":
            return h, None
        if self.likelihood in pixel_likelihoods.LIKELIHOODS:
            return pixel_likelihoods.head(self.likelihood, h, self.channels, self.mixtures)
        raw_mean, raw_log_var = jnp.split(h, 2, axis=-1)
        return DequantizedGaussian(jax.nn.sigmoid(raw_mean), jnp.logaddexp(raw_log_var, self.min_log_var))


class CVAE(nnx.Module):
    """Recognition q(z | x, y), prior p(z | x) and generation p(y | x, z), each an MLP."""

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        *,
        hidden: list[int],
        latent_dim: int,
        prior: str = "learned",
        likelihood: str = "bernoulli",
        min_log_var: float = -6.0,
        channels: int = 1,
        mixtures: int = 10,
        recognition: bool = True,
        baseline_hidden: list[int] | None = None,
        baseline_into: str = "prior",
        baseline_frozen: bool = False,
        activation: str = "relu",
        kernel_init: str = "lecun_normal",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.latent_dim, self.x_dim = latent_dim, x_dim
        net = dict(activation=activation, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
        self.head = OutputHead(likelihood, min_log_var, channels, mixtures)
        # With `baseline_hidden`, the prior network also sees the baseline's prediction y_hat (and, with
        # baseline_into="prior_and_generation", the generation network too).
        aided = baseline_hidden is not None
        self.baseline_into = baseline_into if aided else None
        self.baseline_frozen = baseline_frozen and aided
        h_dim = x_dim + (y_dim if aided else 0)
        g_dim = h_dim if self.baseline_into == "prior_and_generation" else x_dim
        # The GSNN never uses q, so it has no recognition network at all.
        self.recognition = MLP([x_dim + y_dim, *hidden, 2 * latent_dim], **net) if recognition else None
        # A learned prior needs something to condition on; with no condition it is N(0, I).
        self.prior_net = MLP([h_dim, *hidden, 2 * latent_dim], **net) if prior == "learned" and x_dim > 0 else None
        self.generation = MLP([g_dim + latent_dim, *hidden, self.head.width(y_dim)], **net)
        self.baseline = (
            Baseline(
                x_dim,
                y_dim,
                hidden=baseline_hidden,
                likelihood=likelihood,
                min_log_var=min_log_var,
                channels=channels,
                mixtures=mixtures,
                **net,
            )
            if baseline_hidden is not None
            else None
        )

    def context(self, x: jax.Array) -> jax.Array:
        """What the prior network conditions on: x, and the baseline's y_hat when there is one.

        Sohn et al. (2015) build the CVAE on top of the deterministic baseline: its prediction y_hat (the
        "initial guess") is an input of the prior network p(z | x, y_hat) (their Figure 1(d)); with
        baseline_into="prior_and_generation" the generation network p(y | x, y_hat, z) sees it as well.
        y_hat is the baseline's mean: sigmoid(logits) for Bernoulli pixels. A frozen baseline passes no
        gradient (and the train step keeps its parameters as they were).
        """
        if self.baseline is None:
            return x
        y_hat = mean_of(self.baseline(x))
        if self.baseline_frozen:
            y_hat = jax.lax.stop_gradient(y_hat)
        return jnp.concatenate([x, y_hat.astype(x.dtype)], axis=-1)

    def encode(self, x: jax.Array, y: jax.Array) -> Gaussian:
        return _split_gaussian(self.recognition(jnp.concatenate([x, y], axis=-1)))

    def prior(self, x: jax.Array) -> Gaussian:
        return self.prior_given(self.context(x))

    def generate(self, z: jax.Array, x: jax.Array) -> Output:
        """p(y | x, z) for z [B, L], or z [S, B, L]: S samples for each of the B conditions."""
        return self.generate_given(z, self.context(x))

    def prior_given(self, h: jax.Array) -> Gaussian:
        """p(z | x) from h = context(x) (compute h once when several calls share x)."""
        if self.prior_net is None:
            zeros = jnp.zeros((h.shape[0], self.latent_dim), jnp.float32)
            return zeros, zeros
        return _split_gaussian(self.prior_net(h))

    def generate_given(self, z: jax.Array, h: jax.Array) -> Output:
        """p(y | x, z) from h = context(x) [B, H]; z [..., B, L] may carry leading sample axes."""
        if self.baseline_into == "prior":  # the generation network sees x alone
            h = h[..., : self.x_dim]
        h = jnp.broadcast_to(h, (*z.shape[:-1], h.shape[-1]))
        return self.head(self.generation(jnp.concatenate([h, z], axis=-1)))

    def __call__(self, x: jax.Array, y: jax.Array, key: jax.Array) -> tuple[Output, Gaussian, Gaussian]:
        """One reparameterised pass through q: returns (p(y | x, z) parameters, q, p)."""
        h = self.context(x)
        q = self.encode(x, y)
        return self.generate_given(reparameterize(key, q), h), q, self.prior_given(h)


class Baseline(nnx.Module):
    """The deterministic network y_hat = f(x) of the paper's comparison."""

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        *,
        hidden: list[int],
        likelihood: str = "bernoulli",
        min_log_var: float = -6.0,
        channels: int = 1,
        mixtures: int = 10,
        activation: str = "relu",
        kernel_init: str = "lecun_normal",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.head = OutputHead(likelihood, min_log_var, channels, mixtures)
        self.net = MLP(
            [x_dim, *hidden, self.head.width(y_dim)],
            activation=activation,
            kernel_init=kernel_init,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> Output:
        return self.head(self.net(x))
