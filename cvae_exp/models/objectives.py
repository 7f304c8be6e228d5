"""The training objectives and the log-likelihood estimators, built on cvae_exp.models.distributions.

Every function works on a batch and returns per-example values in nats (summed over pixels or
latent dimensions); the training losses average them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cvae_exp.models import kinds
from cvae_exp.models.distributions import gaussian_log_prob, kl_diag_gaussians, log_likelihood, reparameterize

# ----------------------------------------------------------------------------- training objectives
# Each returns (per-example loss, per-example metrics); `elbo` is always the NEGATIVE ELBO (or, for
# models without a recognition network, their own negative log-likelihood term), lower is better.


def cvae_terms(model, x, y, mask, key) -> tuple[jax.Array, jax.Array]:
    """Reconstruction -E_q[log p(y | x, z)] (one sample) and KL(q(z | x, y) || p(z | x))."""
    out, q, p = model(x, y, key)
    return -log_likelihood(y, out, mask), kl_diag_gaussians(q, p)


def gsnn_nll(model, x, y, mask, key) -> jax.Array:
    """-log p(y | x, z) with z drawn from the prior p(z | x): the GSNN's one-sample objective."""
    h = model.context(x)  # x (and the baseline's y_hat), computed once for both networks
    z = reparameterize(key, model.prior_given(h))
    return -log_likelihood(y, model.generate_given(z, h), mask)


def iw_bound(model, x, y, mask, key, *, samples: int, beta) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The importance-weighted bound of Burda, Grosse, Salakhutdinov (2016), eq. (8), with k = `samples` draws
    z_1..z_k of q(z | x, y) (docs/math.md):

        -L_k = -logmeanexp_i [log p(y | x, z_i) + beta * (log p(z_i | x) - log q(z_i | x, y))]

    as the loss (k = 1 with beta = 1: the negative ELBO with its KL estimated at the sample, the objective
    yburda/iwae and nbip/IWAE train at k = 1). Metrics: "elbo" the negative ELBO (reconstruction averaged
    over the k samples, closed-form KL), "iw_bound" the loss at beta = 1."""
    h = model.context(x)
    q, p = model.encode(x, y), model.prior_given(h)
    z = q[0] + jnp.exp(0.5 * q[1]) * jax.random.normal(key, (samples, *q[0].shape), q[0].dtype)  # [k, B, L]
    ll = log_likelihood(y, model.generate_given(z, h), mask)  # [k, B]
    log_ratio = gaussian_log_prob(z, p) - gaussian_log_prob(z, q)
    log_k = math.log(samples)
    loss = log_k - jax.nn.logsumexp(ll + beta * log_ratio, axis=0)
    recon, kl = -jnp.mean(ll, axis=0), kl_diag_gaussians(q, p)
    bound = log_k - jax.nn.logsumexp(ll + log_ratio, axis=0)
    return loss, {"elbo": recon + kl, "recon": recon, "kl": kl, "iw_bound": bound}


def per_example_loss(
    model, x, y, mask, key, *, kind: str, beta, alpha: float, iw_samples: int = 1, sampled_kl: bool = False
):
    """The objective of `kind`: (loss, {"elbo", "recon", "kl"}) per example. The baseline and the GSNN have
    no q: their "elbo" is their own negative log-likelihood term; the hybrid mixes the CVAE's and the GSNN's.
    A cvae or vae with `iw_samples` > 1 (or `sampled_kl`) trains on the importance-weighted bound instead."""
    what = kinds.kind(kind)
    if (iw_samples > 1 or sampled_kl) and what.recognition and not what.prior_term:
        return iw_bound(model, x, y, mask, key, samples=iw_samples, beta=beta)
    if not what.latent:
        nll = -log_likelihood(y, model(x), mask)
        return nll, {"elbo": nll, "recon": nll, "kl": jnp.zeros_like(nll)}
    if not what.recognition:
        nll = gsnn_nll(model, x, y, mask, key)
        return nll, {"elbo": nll, "recon": nll, "kl": jnp.zeros_like(nll)}
    key_q, key_p = jax.random.split(key)
    recon, kl = cvae_terms(model, x, y, mask, key_q)
    loss = recon + beta * kl
    metrics = {"elbo": recon + kl, "recon": recon, "kl": kl}
    if what.prior_term:  # the hybrid: alpha * L_CVAE + (1 - alpha) * L_GSNN
        nll = gsnn_nll(model, x, y, mask, key_p)
        loss = alpha * loss + (1.0 - alpha) * nll
        metrics["gsnn"] = nll
    return loss, metrics


# ----------------------------------------------------------------------------- evaluation


def _sample_loglik(model, x, y, mask, z) -> jax.Array:
    """log p(y | x, z) for a stack of samples z [C, B, L] -> [C, B], through one batched call.

    `generate` takes z with leading sample axes and x without them, so what it derives from x alone (the
    baseline's prediction, `model.baseline_run`) is computed once per chunk, not once per sample.
    """
    return log_likelihood(y, model.generate(z, x), mask)


def conditional_nll(model, x, y, mask, key, *, samples: int, chunk: int, has_q: bool) -> dict[str, jax.Array]:
    """Per-example estimates of -log p(y | x) from `samples` draws, `chunk` at a time.

    ncll_is: importance sampling with proposal q(z | x, y),
             -logmeanexp_s[log p(y | x, z_s) + log p(z_s | x) - log q(z_s | x, y)];
    ncll_mc: Monte Carlo with z from the prior, -logmeanexp_s log p(y | x, z_s);
    neg_elbo: the mean reconstruction over the q samples plus the closed-form KL.
    Running log-sum-exps over chunks keep memory at chunk x batch x pixels whatever `samples` is.
    """
    n_chunks = -(-samples // chunk)
    p = model.prior(x)
    q = model.encode(x, y) if has_q else None
    neg_inf = jnp.full(x.shape[:1], -jnp.inf)

    def body(carry, i):
        lse_is, lse_mc, recon_sum = carry
        key_i = jax.random.fold_in(key, i)
        valid = (i * chunk + jnp.arange(chunk) < samples)[:, None]  # the last chunk may be partial
        eps = jax.random.normal(key_i, (2, chunk, *p[0].shape))
        z_p = p[0] + jnp.exp(0.5 * p[1]) * eps[0]
        ll_mc = jnp.where(valid, _sample_loglik(model, x, y, mask, z_p), -jnp.inf)
        lse_mc = jnp.logaddexp(lse_mc, jax.nn.logsumexp(ll_mc, axis=0))
        if has_q:
            z_q = q[0] + jnp.exp(0.5 * q[1]) * eps[1]
            ll_q = _sample_loglik(model, x, y, mask, z_q)
            log_w = ll_q + gaussian_log_prob(z_q, p) - gaussian_log_prob(z_q, q)
            lse_is = jnp.logaddexp(lse_is, jax.nn.logsumexp(jnp.where(valid, log_w, -jnp.inf), axis=0))
            recon_sum = recon_sum - jnp.sum(jnp.where(valid, ll_q, 0.0), axis=0)
        return (lse_is, lse_mc, recon_sum), None

    init = (neg_inf, neg_inf, jnp.zeros_like(neg_inf))
    (lse_is, lse_mc, recon_sum), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    log_s = math.log(samples)
    result = {"ncll_mc": log_s - lse_mc}
    if has_q:
        result["ncll_is"] = log_s - lse_is
        result["neg_elbo"] = recon_sum / samples + kl_diag_gaussians(q, p)
    return result


def kl_weight(step: jax.Array, beta: float, warmup_steps: int) -> jax.Array:
    """beta, ramped linearly from 0 over the first `warmup_steps` steps when warm-up is on."""
    if warmup_steps <= 0:
        return jnp.asarray(beta, jnp.float32)
    return beta * jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)
