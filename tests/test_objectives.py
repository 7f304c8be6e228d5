"""The maths of cvae_exp.models.objectives checked against independent formulas: the closed-form KL against a Monte
Carlo estimate and the full-covariance formula, the likelihoods against their textbook densities, the
losses against each other, and the importance-sampling estimator against a model whose p(y | x) is exact."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvae_exp.data.geometry import MNIST
from cvae_exp.data.pipeline import prepare_arrays, quadrant_mask
from cvae_exp.models.cvae import CVAE, Baseline, OutputHead
from cvae_exp.models.distributions import gaussian_log_prob, kl_diag_gaussians, log_likelihood, reparameterize
from cvae_exp.models.nets import mlp_nets
from cvae_exp.models.objectives import conditional_nll, kl_weight, per_example_loss

LOG_2PI = math.log(2 * math.pi)
SIDE, PIXELS = MNIST.height, MNIST.dims


def random_gaussian(rng, batch: int, dim: int):
    mean = rng.normal(0.0, 1.0, (batch, dim))
    log_var = rng.uniform(-2.0, 1.5, (batch, dim))
    return mean, log_var


def as_jax(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


# ----------------------------------------------------------------------------- KL


def kl_full_covariance(m1, S1, m2, S2) -> float:
    """KL(N(m1, S1) || N(m2, S2)) with the general formula, in float64."""
    n = len(m1)
    S2_inv = np.linalg.inv(S2)
    d = m2 - m1
    _, logdet1 = np.linalg.slogdet(S1)
    _, logdet2 = np.linalg.slogdet(S2)
    return 0.5 * (logdet2 - logdet1 - n + np.trace(S2_inv @ S1) + d @ S2_inv @ d)


def test_kl_matches_the_full_covariance_formula():
    rng = np.random.default_rng(0)
    (mq, lq), (mp, lp) = random_gaussian(rng, 16, 5), random_gaussian(rng, 16, 5)
    got = np.asarray(kl_diag_gaussians(as_jax(mq, lq), as_jax(mp, lp)))
    want = [kl_full_covariance(mq[i], np.diag(np.exp(lq[i])), mp[i], np.diag(np.exp(lp[i]))) for i in range(16)]
    assert got.shape == (16,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kl_matches_a_monte_carlo_estimate():
    rng = np.random.default_rng(1)
    (mq, lq), (mp, lp) = random_gaussian(rng, 4, 3), random_gaussian(rng, 4, 3)
    n = 200_000

    def log_normal(z, m, lv):  # explicit diagonal normal log density, float64
        return np.sum(-0.5 * (LOG_2PI + lv + (z - m) ** 2 / np.exp(lv)), axis=-1)

    got = np.asarray(kl_diag_gaussians(as_jax(mq, lq), as_jax(mp, lp)))
    for i in range(4):
        z = mq[i] + np.exp(0.5 * lq[i]) * rng.standard_normal((n, 3))
        diff = log_normal(z, mq[i], lq[i]) - log_normal(z, mp[i], lp[i])
        stderr = diff.std() / math.sqrt(n)
        assert abs(diff.mean() - got[i]) < 5 * stderr + 1e-4, (i, diff.mean(), got[i], stderr)


def test_kl_of_a_distribution_with_itself_is_zero_and_kl_is_nonnegative():
    rng = np.random.default_rng(2)
    q, p = random_gaussian(rng, 256, 7), random_gaussian(rng, 256, 7)
    np.testing.assert_allclose(np.asarray(kl_diag_gaussians(as_jax(*q), as_jax(*q))), 0.0, atol=1e-5)
    kl = np.asarray(kl_diag_gaussians(as_jax(*q), as_jax(*p)))
    assert np.all(kl >= 0.0) and np.all(kl > 1e-3)  # distinct random Gaussians are strictly apart


def test_kl_against_the_standard_normal_is_the_vae_formula():
    rng = np.random.default_rng(3)
    m, lv = random_gaussian(rng, 32, 6)
    zeros = np.zeros_like(m)
    got = np.asarray(kl_diag_gaussians(as_jax(m, lv), as_jax(zeros, zeros)))
    want = -0.5 * np.sum(1 + lv - m**2 - np.exp(lv), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_is_the_normal_density():
    rng = np.random.default_rng(4)
    m, lv = random_gaussian(rng, 8, 4)
    z = rng.normal(size=(8, 4))
    want = np.sum(-0.5 * np.log(2 * np.pi * np.exp(lv)) - (z - m) ** 2 / (2 * np.exp(lv)), axis=-1)
    np.testing.assert_allclose(np.asarray(gaussian_log_prob(*as_jax(z), as_jax(m, lv))), want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- likelihoods


def test_bernoulli_log_likelihood_is_the_explicit_formula_and_respects_the_mask():
    rng = np.random.default_rng(5)
    logits = rng.uniform(-8.0, 8.0, (6, 50))
    y = np.concatenate([rng.integers(0, 2, (3, 50)), rng.uniform(0, 1, (3, 50))])  # binary and grayscale targets
    mask = (rng.uniform(size=(6, 50)) < 0.6).astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-logits))
    want = np.sum(mask * (y * np.log(sig) + (1 - y) * np.log(1 - sig)), axis=-1)
    got = np.asarray(
        log_likelihood(*as_jax(y), (jnp.asarray(logits, jnp.float32), None), jnp.asarray(mask, jnp.float32))
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    # Changing targets and logits where mask = 0 changes nothing.
    y2 = np.where(mask > 0, y, 1.0 - y)
    logits2 = np.where(mask > 0, logits, -logits + 3.0)
    got2 = np.asarray(
        log_likelihood(*as_jax(y2), (jnp.asarray(logits2, jnp.float32), None), jnp.asarray(mask, jnp.float32))
    )
    np.testing.assert_allclose(got2, got, rtol=1e-6, atol=1e-4)
    assert np.all(np.asarray(log_likelihood(*as_jax(y), as_jax(logits) + (None,), jnp.zeros((6, 50)))) == 0.0)


def test_gaussian_log_likelihood_is_the_explicit_density_and_respects_the_mask():
    rng = np.random.default_rng(6)
    mean, log_var = rng.uniform(0, 1, (5, 40)), rng.uniform(-4.0, 1.0, (5, 40))
    y = rng.uniform(0, 1, (5, 40))
    mask = (rng.uniform(size=(5, 40)) < 0.5).astype(np.float64)
    var = np.exp(log_var)
    density = np.exp(-((y - mean) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)
    want = np.sum(mask * np.log(density), axis=-1)
    got = np.asarray(log_likelihood(*as_jax(y), as_jax(mean, log_var), jnp.asarray(mask, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_gaussian_head_floors_the_log_variance_and_keeps_constant_targets_finite():
    floor = -6.0
    head = OutputHead("gaussian", min_log_var=floor)
    assert head.width(10) == 20
    raw_mean = jnp.full((2, 10), -1e4)  # mean saturates to exactly 0, the value of a constant border pixel
    raw_log_var = jnp.array([[-1e4] * 10, [-50.0] * 5 + [5.0] * 5])
    mean, log_var = head(jnp.concatenate([raw_mean, raw_log_var], axis=-1))
    assert np.all(np.asarray(log_var) >= floor)
    np.testing.assert_allclose(np.asarray(log_var[0]), floor, atol=1e-6)  # the floor is reached, not undershot
    np.testing.assert_allclose(np.asarray(log_var[1, 5:]), 5.0, atol=1e-3)  # far above the floor: untouched
    y = jnp.zeros((2, 10))
    ll = log_likelihood(y, (mean, log_var), jnp.ones_like(y))
    assert np.all(np.isfinite(np.asarray(ll)))
    # With the variance floored, the density of a perfect prediction is bounded by N(0; 0, e^floor).
    assert np.all(np.asarray(ll) <= 10 * 0.5 * (-floor - LOG_2PI) + 1e-3)

    # The gradient with respect to the raw output stays finite too (no NaN from a collapsing variance).
    def loss(raw):
        out = head(raw)
        return -jnp.sum(log_likelihood(y, out, jnp.ones_like(y)))

    grad = jax.grad(loss)(jnp.concatenate([raw_mean, raw_log_var], axis=-1))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_bernoulli_head_passes_logits_through():
    head = OutputHead("bernoulli", min_log_var=-6.0)
    h = jnp.arange(6.0).reshape(2, 3)
    logits, log_var = head(h)
    assert log_var is None and head.width(3) == 3
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(h))


# ----------------------------------------------------------------------------- reparameterization


def test_reparameterize_has_the_right_moments():
    n = 100_000
    mean = jnp.broadcast_to(jnp.array([1.0, -2.0, 0.0]), (n, 3))
    var = np.array([0.25, 4.0, 1.0])
    log_var = jnp.broadcast_to(jnp.log(jnp.asarray(var, jnp.float32)), (n, 3))
    z = np.asarray(reparameterize(jax.random.key(0), (mean, log_var)), np.float64)
    assert z.shape == (n, 3)
    # standard errors: of the mean sqrt(var / n); of the sample variance var * sqrt(2 / n)
    np.testing.assert_array_less(np.abs(z.mean(0) - [1.0, -2.0, 0.0]), 5 * np.sqrt(var / n))
    np.testing.assert_array_less(np.abs(z.var(0) - var), 5 * var * np.sqrt(2 / n))
    assert abs(np.corrcoef(z[:, 0], z[:, 1])[0, 1]) < 5 / np.sqrt(n)  # independent coordinates


def test_reparameterize_passes_gradients_to_mean_and_log_var():
    rng = np.random.default_rng(7)
    mean, log_var = as_jax(*random_gaussian(rng, 4, 3))
    key = jax.random.key(1)
    g_mean, g_log_var = jax.grad(lambda m, lv: jnp.sum(reparameterize(key, (m, lv))), argnums=(0, 1))(mean, log_var)
    z = reparameterize(key, (mean, log_var))
    np.testing.assert_allclose(np.asarray(g_mean), 1.0)
    # z = m + exp(lv / 2) eps, so dz / dlv = (z - m) / 2
    np.testing.assert_allclose(np.asarray(g_log_var), 0.5 * np.asarray(z - mean), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g_log_var) != 0.0)


# ----------------------------------------------------------------------------- training losses


@pytest.fixture(scope="module")
def small_cvae():
    """A CVAE on label-like conditions and 20-pixel targets, with all three networks."""
    model = CVAE(10, 20, nets=mlp_nets([16], 20, seed=0), latent_dim=3, prior="learned")
    rng = np.random.default_rng(8)
    x = jax.nn.one_hot(jnp.arange(6) % 10, 10)
    y = jnp.asarray(rng.integers(0, 2, (6, 20)), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(6, 20)) < 0.7, jnp.float32)
    return model, x, y, mask


def _loss(model, x, y, mask, key, kind, beta=1.0, alpha=0.5):
    loss, metrics = per_example_loss(model, x, y, mask, key, kind=kind, beta=beta, alpha=alpha)
    return np.asarray(loss), {k: np.asarray(v) for k, v in metrics.items()}


def test_cvae_elbo_is_recon_plus_kl_and_beta_weighs_the_kl(small_cvae):
    model, x, y, mask = small_cvae
    key = jax.random.key(3)
    loss1, m1 = _loss(model, x, y, mask, key, "cvae", beta=1.0)
    loss_half, m_half = _loss(model, x, y, mask, key, "cvae", beta=0.5)
    np.testing.assert_allclose(m1["elbo"], m1["recon"] + m1["kl"], rtol=1e-6)
    np.testing.assert_allclose(loss1, m1["elbo"], rtol=1e-6)
    np.testing.assert_allclose(loss_half, m1["recon"] + 0.5 * m1["kl"], rtol=1e-6)
    np.testing.assert_allclose(m_half["elbo"], m1["elbo"], rtol=1e-6)  # the reported ELBO is never beta-weighted
    assert np.all(m1["kl"] > 0) and np.all(m1["recon"] > 0)
    # The reconstruction is -log p(y | x, z) with one z from q, through the key split the loss documents.
    key_q = jax.random.split(key)[0]
    out, q, p = model(x, y, key_q)
    np.testing.assert_allclose(m1["recon"], -np.asarray(log_likelihood(y, out, mask)), rtol=1e-6)
    np.testing.assert_allclose(m1["kl"], np.asarray(kl_diag_gaussians(q, p)), rtol=1e-6)


def test_hybrid_interpolates_between_cvae_and_gsnn(small_cvae):
    model, x, y, mask = small_cvae
    key = jax.random.key(4)
    cvae, _ = _loss(model, x, y, mask, key, "cvae")
    # The hybrid splits its key into (key_q, key_p) and draws the GSNN term's z with key_p; the pure
    # GSNN uses its whole key. So the GSNN loss with key_p is the hybrid's GSNN term exactly.
    gsnn, _ = _loss(model, x, y, mask, jax.random.split(key)[1], "gsnn")
    hyb1, _ = _loss(model, x, y, mask, key, "hybrid", alpha=1.0)
    hyb0, m0 = _loss(model, x, y, mask, key, "hybrid", alpha=0.0)
    hyb_q, _ = _loss(model, x, y, mask, key, "hybrid", alpha=0.25)
    np.testing.assert_allclose(hyb1, cvae, rtol=1e-6)
    np.testing.assert_allclose(hyb0, gsnn, rtol=1e-6)
    np.testing.assert_allclose(m0["gsnn"], gsnn, rtol=1e-6)
    np.testing.assert_allclose(hyb_q, 0.25 * cvae + 0.75 * gsnn, rtol=1e-5)
    assert not np.allclose(cvae, gsnn)  # the two objectives do differ, so the checks above mean something


def test_gsnn_draws_z_from_the_prior_and_needs_no_recognition_network():
    model = CVAE(10, 20, nets=mlp_nets([16], 20, seed=1), latent_dim=3, recognition=False)
    assert model.recognition is None
    x = jax.nn.one_hot(jnp.arange(4), 10)
    y = jnp.ones((4, 20))
    key = jax.random.key(5)
    loss, metrics = _loss(model, x, y, jnp.ones_like(y), key, "gsnn")
    z = reparameterize(key, model.prior(x))
    np.testing.assert_allclose(loss, -np.asarray(log_likelihood(y, model.generate(z, x), jnp.ones_like(y))), rtol=1e-6)
    np.testing.assert_array_equal(metrics["kl"], 0.0)
    np.testing.assert_allclose(metrics["elbo"], loss)


def test_baseline_loss_is_its_negative_log_likelihood():
    model = Baseline(10, 20, nets=mlp_nets([16], 20, seed=2))
    x = jax.nn.one_hot(jnp.arange(4), 10)
    y = jnp.asarray(np.random.default_rng(9).integers(0, 2, (4, 20)), jnp.float32)
    mask = jnp.ones_like(y).at[:, :5].set(0.0)
    loss, metrics = _loss(model, x, y, mask, jax.random.key(0), "baseline")
    np.testing.assert_allclose(loss, -np.asarray(log_likelihood(y, model(x), mask)), rtol=1e-6)
    np.testing.assert_array_equal(metrics["kl"], 0.0)


def test_vae_kl_is_against_the_standard_normal():
    model = CVAE(0, 20, nets=mlp_nets([16], 20, seed=3), latent_dim=3, prior="standard")
    assert model.prior_net is None
    x = jnp.zeros((5, 0))
    y = jnp.asarray(np.random.default_rng(10).integers(0, 2, (5, 20)), jnp.float32)
    _, metrics = _loss(model, x, y, jnp.ones_like(y), jax.random.key(0), "vae")
    m, lv = model.encode(x, y)
    want = -0.5 * np.sum(1 + np.asarray(lv) - np.asarray(m) ** 2 - np.exp(np.asarray(lv)), axis=-1)
    np.testing.assert_allclose(metrics["kl"], want, rtol=1e-5, atol=1e-6)


def test_kl_weight_ramps_linearly_to_beta():
    assert float(kl_weight(jnp.int32(0), 2.0, 0)) == 2.0
    assert float(kl_weight(jnp.int32(0), 2.0, 10)) == 0.0
    assert float(kl_weight(jnp.int32(5), 2.0, 10)) == pytest.approx(1.0)
    assert float(kl_weight(jnp.int32(10), 2.0, 10)) == pytest.approx(2.0)
    assert float(kl_weight(jnp.int32(1000), 2.0, 10)) == pytest.approx(2.0)


# ----------------------------------------------------------------------------- the importance-sampling estimator


class LinearGaussian:
    """z ~ N(0, I), y = A z + b + noise with diagonal variance d: p(y | x) = N(b, A A^T + diag(d)) exactly.

    It exposes what `conditional_nll` calls (`prior`, `encode`, `generate`, each returning (mean, log-variance)).
    The proposal q is the exact posterior p(z | y_scored) moved by `shift` posterior standard deviations and
    with its variances multiplied by `widen`, and diagonal (the true posterior is not, unless L = 1).
    """

    def __init__(self, A, b, d, scored, *, shift=0.0, widen=1.0):
        self.A, self.b, self.d = np.asarray(A, np.float64), np.asarray(b, np.float64), np.asarray(d, np.float64)
        self.scored = np.asarray(scored, np.float64)  # the mask: which dims of y are scored
        self.L = self.A.shape[1]
        self.post_cov = np.linalg.inv(np.eye(self.L) + (self.A.T * (self.scored / self.d)) @ self.A)
        self.shift, self.widen = shift, widen

    def q_params(self, y):
        """The proposal's (mean, log-variance) per example, float64."""
        var = np.diag(self.post_cov)
        mean = (np.asarray(y, np.float64) - self.b) @ self.to_z() + self.shift * np.sqrt(var)
        return mean, np.broadcast_to(np.log(var * self.widen), mean.shape)

    def to_z(self):
        """The matrix taking y - b to the posterior mean of z."""
        return ((self.scored / self.d)[:, None] * self.A) @ self.post_cov.T

    def view(self) -> LinearGaussianModule:
        """The model as `conditional_nll` sees it, a pytree of float32 arrays (so one compile serves many)."""
        var = np.diag(self.post_cov)
        leaves = (self.A.T, self.b, np.log(self.d), self.to_z(), self.shift * np.sqrt(var), np.log(var * self.widen))
        return LinearGaussianModule(*(jnp.asarray(a, jnp.float32) for a in leaves))

    def exact_nll(self, y):
        s = self.scored.astype(bool)
        cov = (self.A @ self.A.T + np.diag(self.d))[np.ix_(s, s)]
        r = np.asarray(y, np.float64)[:, s] - self.b[s]
        _, logdet = np.linalg.slogdet(cov)
        return 0.5 * (s.sum() * LOG_2PI + logdet + np.einsum("bi,ij,bj->b", r, np.linalg.inv(cov), r))

    def exact_neg_elbo(self, y):
        """-E_q[log p(y | z)] + KL(q || N(0, I)), in closed form."""
        m, lv = self.q_params(y)
        v = np.exp(lv)
        s = self.scored
        r = np.asarray(y, np.float64) - m @ self.A.T - self.b
        expected_sq = r**2 + (v @ (self.A**2).T)  # E_q[(y - A z - b)^2] per dim
        recon = 0.5 * np.sum(s * (LOG_2PI + np.log(self.d) + expected_sq / self.d), axis=-1)
        kl = -0.5 * np.sum(1 + lv - m**2 - v, axis=-1)
        return recon + kl

    def log_weights(self, y, n, rng):
        """log p(y, z) - log q(z) for n draws z ~ q per example, float64: [B, n]."""
        m, lv = self.q_params(y)
        z = m[:, None] + np.exp(0.5 * lv)[:, None] * rng.standard_normal((len(m), n, self.L))
        mean = z @ self.A.T + self.b
        ll = np.sum(self.scored * -0.5 * (LOG_2PI + np.log(self.d) + (np.asarray(y)[:, None] - mean) ** 2 / self.d), -1)
        lp = np.sum(-0.5 * (LOG_2PI + z**2), -1)
        lq = np.sum(-0.5 * (LOG_2PI + lv[:, None] + (z - m[:, None]) ** 2 / np.exp(lv)[:, None]), -1)
        return ll + lp - lq


@jax.tree_util.register_pytree_node_class
class LinearGaussianModule:
    """prior(x), encode(x, y), generate(z, x) of a LinearGaussian, each returning (mean, log-variance)."""

    def __init__(self, A_T, b, log_d, to_z, q_offset, q_log_var):
        self.A_T, self.b, self.log_d, self.to_z, self.q_offset, self.q_log_var = (
            A_T,
            b,
            log_d,
            to_z,
            q_offset,
            q_log_var,
        )

    def tree_flatten(self):
        return (self.A_T, self.b, self.log_d, self.to_z, self.q_offset, self.q_log_var), None

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        return cls(*leaves)

    def prior(self, x):
        zeros = jnp.zeros((x.shape[0], self.A_T.shape[0]), jnp.float32)
        return zeros, zeros

    def encode(self, x, y):
        mean = (y - self.b) @ self.to_z + self.q_offset
        return mean, jnp.broadcast_to(self.q_log_var, mean.shape)

    def generate(self, z, x):
        mean = z @ self.A_T + self.b
        return mean, jnp.broadcast_to(self.log_d, mean.shape)


def linear_gaussian_problem(latent: int, *, seed=0, batch=8, y_dim=6, scored=None, **q):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(y_dim, latent))
    b = rng.normal(size=y_dim)
    d = np.exp(rng.uniform(np.log(0.3), np.log(1.0), y_dim))
    scored = np.ones(y_dim) if scored is None else np.asarray(scored, np.float64)
    model = LinearGaussian(A, b, d, scored, **q)
    z = rng.normal(size=(batch, latent))
    y = z @ A.T + b + rng.normal(size=(batch, y_dim)) * np.sqrt(d)
    x = jnp.zeros((batch, 1), jnp.float32)
    mask = jnp.broadcast_to(jnp.asarray(scored, jnp.float32), y.shape)
    return model, x, jnp.asarray(y, jnp.float32), mask, y


_conditional_nll = jax.jit(conditional_nll, static_argnames=("samples", "chunk", "has_q"))


def estimate(model, x, y, mask, *, samples, chunk, key=0, has_q=True):
    out = _conditional_nll(model.view(), x, y, mask, jax.random.key(key), samples=samples, chunk=chunk, has_q=has_q)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


@pytest.mark.parametrize("scored", [None, [1, 0, 1, 1, 0, 1]], ids=["all", "masked"])
@pytest.mark.parametrize("samples, chunk", [(1, 1), (7, 3), (250, 100)])
def test_importance_sampling_is_exact_with_the_exact_posterior(scored, samples, chunk):
    # With one latent dimension the diagonal q can be the exact posterior; then every importance weight
    # equals p(y | x), and the estimate is exact for any number of samples, any chunking (a partial last
    # chunk included) and any mask.
    model, x, y, mask, y64 = linear_gaussian_problem(1, scored=scored)
    got = estimate(model, x, y, mask, samples=samples, chunk=chunk)
    np.testing.assert_allclose(got["ncll_is"], model.exact_nll(y64), rtol=1e-5, atol=2e-4)
    # And the bound is tight: the negative ELBO is the NLL too, up to Monte Carlo noise in its recon term.
    if samples >= 250:
        np.testing.assert_allclose(got["neg_elbo"], model.exact_nll(y64), atol=0.5)


def test_importance_sampling_converges_to_the_exact_nll_with_an_imperfect_proposal():
    model, x, y, mask, y64 = linear_gaussian_problem(2, shift=1.0, widen=2.0)
    # The weights have finite variance only if 2 Sigma^-1 - Q^-1 is positive definite (Sigma: the posterior
    # covariance, Q: the proposal's); that is what makes the 1/sqrt(S) error model below valid.
    q_var = np.diag(model.post_cov) * model.widen
    assert np.all(np.linalg.eigvalsh(2 * np.linalg.inv(model.post_cov) - np.diag(1 / q_var)) > 0)
    # Relative variance rho^2 = Var(w) / E[w]^2 of the weights, per example, from many float64 draws.
    log_w = model.log_weights(y64, 100_000, np.random.default_rng(11))
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    rho = np.sqrt(w.var(axis=1) / w.mean(axis=1) ** 2)
    assert np.all(rho > 0.1)  # the proposal really is imperfect

    exact = model.exact_nll(y64)
    err = {s: np.abs(estimate(model, x, y, mask, samples=s, chunk=min(s, 500))["ncll_is"] - exact) for s in (5, 5000)}
    # -log(mean of S weights) has standard deviation ~ rho / sqrt(S) and bias ~ rho^2 / (2 S) (delta method).
    tolerance = 5 * rho / math.sqrt(5000) + rho**2 / 5000 + 1e-3
    assert np.all(err[5000] < tolerance), (err[5000], tolerance)
    assert err[5000].mean() < err[5].mean() / 5


def test_importance_sampling_is_below_the_negative_elbo_and_both_match_their_closed_forms():
    model, x, y, mask, y64 = linear_gaussian_problem(2, shift=1.0, widen=2.0, seed=1)
    exact_nll, exact_neg_elbo = model.exact_nll(y64), model.exact_neg_elbo(y64)
    gap = exact_neg_elbo - exact_nll  # KL(q || posterior), > 0 for this imperfect q
    assert np.all(gap > 0.1)
    for samples in (5, 50, 5000):
        got = estimate(model, x, y, mask, samples=samples, chunk=min(samples, 500), key=samples)
        assert got["ncll_is"].mean() <= got["neg_elbo"].mean()
    # At S = 5000 the neg-ELBO's one Monte Carlo term (the reconstruction) is close to its closed form.
    np.testing.assert_allclose(got["neg_elbo"], exact_neg_elbo, atol=0.1)
    assert np.all(got["ncll_is"] < exact_neg_elbo)


def test_chunking_does_not_change_the_estimate_beyond_sampling_noise():
    model, x, y, mask, y64 = linear_gaussian_problem(2, shift=1.0, widen=2.0, seed=2)
    exact = model.exact_nll(y64)
    a = estimate(model, x, y, mask, samples=5000, chunk=100)
    b = estimate(model, x, y, mask, samples=5000, chunk=500)
    c = estimate(model, x, y, mask, samples=5000, chunk=500)
    # Different chunk sizes draw different samples (one key per chunk), so they agree up to noise...
    np.testing.assert_allclose(a["ncll_is"], exact, atol=0.1)
    np.testing.assert_allclose(b["ncll_is"], exact, atol=0.1)
    # ...and the same chunking with the same key is deterministic.
    np.testing.assert_array_equal(b["ncll_is"], c["ncll_is"])


def test_monte_carlo_estimate_from_the_prior_converges_too():
    model, x, y, mask, y64 = linear_gaussian_problem(2, shift=1.0, widen=2.0, seed=3)
    got = estimate(model, x, y, mask, samples=20_000, chunk=2000)
    np.testing.assert_allclose(got["ncll_mc"], model.exact_nll(y64), atol=0.1)
    assert set(estimate(model, x, y, mask, samples=10, chunk=10, has_q=False)) == {"ncll_mc"}


# ----------------------------------------------------------------------------- quadrant masks


def _quadrants_given(n_given: int, layout: str) -> np.ndarray:
    """Observed pixels written out by rows and columns, for both layouts the config offers:
    top_first: 1 top-left, 2 top half, 3 all but bottom-right;
    left_first: 1 bottom-left, 2 left half, 3 all but bottom-right."""
    rows, cols = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    top, left = rows < SIDE // 2, cols < SIDE // 2
    given = {
        "top_first": {1: top & left, 2: top, 3: top | left},
        "left_first": {1: ~top & left, 2: left, 3: top | left},
    }[layout][n_given]
    return given.reshape(PIXELS)


@pytest.mark.parametrize("layout", ["top_first", "left_first"])
@pytest.mark.parametrize("n_given", [1, 2, 3])
def test_quadrant_condition_scores_exactly_the_unobserved_pixels(n_given, layout):
    given = _quadrants_given(n_given, layout)
    np.testing.assert_array_equal(quadrant_mask(n_given, layout, MNIST) > 0, given)
    rng = np.random.default_rng(n_given)
    batch = {"image": rng.integers(0, 256, (3, PIXELS)).astype(np.uint8), "label": np.arange(3)}
    x, y, mask = prepare_arrays(
        batch, jax.random.key(0), geometry=MNIST, dynamic=False, condition="quadrants", n_given=n_given, layout=layout
    )
    x, y, mask = map(np.asarray, (x, y, mask))
    np.testing.assert_array_equal(mask, np.broadcast_to(~given, mask.shape).astype(np.float32))
    assert mask.sum() == 3 * (4 - n_given) * (SIDE // 2) ** 2
    np.testing.assert_allclose(y, batch["image"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(x[:, given], y[:, given])  # the observed pixels are the condition
    np.testing.assert_array_equal(x[:, ~given], -1.0)  # unobserved marked -1, distinct from black
    # The likelihood ignores everything outside the scored pixels.
    logits = jnp.asarray(rng.normal(size=(3, PIXELS)), jnp.float32)
    scrambled = jnp.asarray(np.where(given, 1.0 - y, y), jnp.float32)
    ll = log_likelihood(jnp.asarray(y), (logits, None), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(log_likelihood(scrambled, (logits, None), jnp.asarray(mask))), np.asarray(ll))
