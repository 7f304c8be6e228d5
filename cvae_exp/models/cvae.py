"""The conditional VAE of Sohn, Lee and Yan (2015) and the deterministic baseline.

Notation follows the paper: x is the condition, y the output, z the latent. A VAE is the same module
with an empty condition (x_dim = 0) and the fixed prior N(0, I). A CVAE built with `aided=True`
holds a `Baseline` whose prediction feeds its prior network, and with `baseline_into="prior_and_generation"`
its generation network too (`model.baseline_run`). Every network comes from one factory
(cvae_exp.models.nets.NetFactory, the `model.net` config: an MLP, the convolutional network, or a user's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cvae_exp.models import pixel_likelihoods
from cvae_exp.models.distributions import Gaussian, Output, mean_of, reparameterize
from cvae_exp.models.nets import Input, NetFactory, check_gaussian, to_flat
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

    def image_channels(self, y_dim: int, pixels: int) -> int:
        """Channels per pixel of a network's image output [..., H, W, F] that `from_image` turns into width(y_dim)."""
        return self.width(y_dim) // pixels

    def from_image(self, h: jax.Array) -> jax.Array:
        """An image output [..., H, W, F] as this head's flat input: the (mean, log-variance) heads take the
        first F / 2 channels of every pixel as the means and the rest as the log-variances (their flat layout
        is all means, then all log-variances); the others read each pixel's channels in place."""
        lead, grouped = h.shape[:-3], self.likelihood in ("gaussian", "discretized_gaussian")
        if not grouped:
            return h.reshape(*lead, -1)
        means, log_vars = jnp.split(h, 2, axis=-1)
        return jnp.concatenate([means.reshape(*lead, -1), log_vars.reshape(*lead, -1)], axis=-1)

    def __call__(self, h: jax.Array) -> Output:
        if self.likelihood == "bernoulli":
            return h, None
        if self.likelihood in pixel_likelihoods.LIKELIHOODS:
            return pixel_likelihoods.head(self.likelihood, h, self.channels, self.mixtures)
        raw_mean, raw_log_var = jnp.split(h, 2, axis=-1)
        return DequantizedGaussian(jax.nn.sigmoid(raw_mean), jnp.logaddexp(raw_log_var, self.min_log_var))


class CVAE(nnx.Module):
    """Recognition q(z | x, y), prior p(z | x) and generation p(y | x, z), each built by `nets`."""

    def __init__(
        self,
        x_dim: int,
        y_dim: int,
        *,
        nets: NetFactory,
        latent_dim: int,
        x_image: bool = False,
        prior: str = "learned",
        likelihood: str = "bernoulli",
        min_log_var: float = -6.0,
        channels: int = 1,
        mixtures: int = 10,
        recognition: bool = True,
        aided: bool = False,
        baseline_hidden: list[int] | None = None,
        baseline_into: str = "prior",
        baseline_frozen: bool = False,
    ):
        self.latent_dim, self.x_dim = latent_dim, x_dim
        self.head = OutputHead(likelihood, min_log_var, channels, mixtures)
        # With `aided`, the prior network also sees the baseline's prediction y_hat (and, with
        # baseline_into="prior_and_generation", the generation network too).
        self.baseline_into = baseline_into if aided else None
        self.baseline_frozen = baseline_frozen and aided
        x = Input("x", x_dim, x_image)
        y, y_hat, z = Input("y", y_dim, True), Input("y_hat", y_dim, True), Input("z", latent_dim, False)
        pixels = nets.geometry.pixels
        # Each network's contract (cvae_exp.models.nets.NetSpec) is kept beside it.
        self.recognition_spec = nets.spec("recognition", (x, y), 2 * latent_dim)
        self.prior_spec = nets.spec("prior", (x, y_hat) if aided else (x,), 2 * latent_dim)
        g_inputs = (x, y_hat, z) if self.baseline_into == "prior_and_generation" else (x, z)
        width = self.head.width(y_dim)
        self.generation_spec = nets.spec("generation", g_inputs, width, self.head.image_channels(y_dim, pixels))
        # The GSNN never uses q, so it has no recognition network at all.
        self.recognition = nets.build(self.recognition_spec) if recognition else None
        # A learned prior needs something to condition on; with no condition it is N(0, I).
        self.prior_net = nets.build(self.prior_spec) if prior == "learned" and x_dim > 0 else None
        self.generation = nets.build(self.generation_spec)
        self.baseline = (
            Baseline(
                x_dim,
                y_dim,
                nets=nets,
                x_image=x_image,
                hidden=baseline_hidden,
                likelihood=likelihood,
                min_log_var=min_log_var,
                channels=channels,
                mixtures=mixtures,
            )
            if aided
            else None
        )

    def context(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """What the prior network conditions on: (x,), or (x, y_hat) with the baseline's prediction.

        Sohn et al. (2015) build the CVAE on top of the deterministic baseline: its prediction y_hat (the
        "initial guess") is an input of the prior network p(z | x, y_hat) (their Figure 1(d)); with
        baseline_into="prior_and_generation" the generation network p(y | x, y_hat, z) sees it as well.
        y_hat is the baseline's mean: sigmoid(logits) for Bernoulli pixels. A frozen baseline passes no
        gradient (and the train step keeps its parameters as they were).
        """
        if self.baseline is None:
            return (x,)
        y_hat = mean_of(self.baseline(x))
        if self.baseline_frozen:
            y_hat = jax.lax.stop_gradient(y_hat)
        return x, y_hat.astype(x.dtype)

    def encode(self, x: jax.Array, y: jax.Array) -> Gaussian:
        spec = self.recognition_spec
        return _split_gaussian(check_gaussian(self.recognition(x, y), spec, spec.lead(x, y)))

    def prior(self, x: jax.Array) -> Gaussian:
        return self.prior_given(self.context(x))

    def generate(self, z: jax.Array, x: jax.Array) -> Output:
        """p(y | x, z) for z [B, L], or z [S, B, L]: S samples for each of the B conditions."""
        return self.generate_given(z, self.context(x))

    def prior_given(self, h: tuple[jax.Array, ...]) -> Gaussian:
        """p(z | x) from h = context(x) (compute h once when several calls share x)."""
        if self.prior_net is None:
            zeros = jnp.zeros((h[0].shape[0], self.latent_dim), jnp.float32)
            return zeros, zeros
        spec = self.prior_spec
        return _split_gaussian(check_gaussian(self.prior_net(*h), spec, spec.lead(*h)))

    def generate_given(self, z: jax.Array, h: tuple[jax.Array, ...]) -> Output:
        """p(y | x, z) from h = context(x), each [B, ...]; z [..., B, L] may carry leading sample axes."""
        if self.baseline_into == "prior":  # the generation network sees x alone
            h = h[:1]
        inputs, spec = (*h, z), self.generation_spec
        return self.head(to_flat(self.generation(*inputs), spec, spec.lead(*inputs), self.head.from_image))

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
        nets: NetFactory,
        x_image: bool = False,
        hidden: list[int] | None = None,
        likelihood: str = "bernoulli",
        min_log_var: float = -6.0,
        channels: int = 1,
        mixtures: int = 10,
    ):
        self.head = OutputHead(likelihood, min_log_var, channels, mixtures)
        width, pixels = self.head.width(y_dim), nets.geometry.pixels
        x = Input("x", x_dim, x_image)
        self.spec = nets.spec("baseline", (x,), width, self.head.image_channels(y_dim, pixels), hidden=hidden)
        self.net = nets.build(self.spec)

    def __call__(self, x: jax.Array) -> Output:
        return self.head(to_flat(self.net(x), self.spec, x.shape[:-1], self.head.from_image))
