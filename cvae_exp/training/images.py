"""What the model draws: reconstructions, samples per class, quadrant completions (as digit stacks).

Each function returns [rows, cols, 784] values in [0, 1] (Bernoulli means or Gaussian means), ready
for `cvae_exp.runs.tensorboard.tile`. They are pure functions of (params, inputs, key); callers jit them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cvae_exp.data.pipeline import NUM_CLASSES, prepare
from cvae_exp.models.distributions import reparameterize
from cvae_exp.models.kinds import kind


def _mean(out) -> jax.Array:
    loc, log_var = out
    return jax.nn.sigmoid(loc) if log_var is None else loc


def _predict(model, x, y, key, name: str) -> jax.Array:
    """One draw of y's mean: through q for a reconstruction (y given, kinds with q), through p otherwise."""
    if not kind(name).latent:
        return _mean(model(x))
    if not kind(name).recognition or y is None:
        return _mean(model.generate(reparameterize(key, model.prior(x)), x))
    out, _, _ = model(x, y, key)
    return _mean(out)


def reconstructions(graphdef, params, batch, key, *, task) -> jax.Array:
    """Rows of (input, reconstruction) pairs: [n, 2, 784]."""
    model = nnx.merge(graphdef, params)
    x, y, _ = prepare(batch, key, task)
    return jnp.stack([y, _predict(model, x, y, key, task.kind)], axis=1)


def class_samples(graphdef, params, key, *, task, cols: int = 10) -> jax.Array:
    """[10, cols, 784]: row d holds samples for label d (or unconditional samples without labels)."""
    model = nnx.merge(graphdef, params)
    labels = jnp.repeat(jnp.arange(NUM_CLASSES), cols)
    x = jax.nn.one_hot(labels, NUM_CLASSES) if task.condition == "label" else jnp.zeros((len(labels), 0))
    return _predict(model, x, None, key, task.kind).reshape(NUM_CLASSES, cols, -1)


def completions(graphdef, params, batch, key, *, task, samples: int = 6) -> jax.Array:
    """Quadrant task, one row per input: the condition, `samples` completions, the truth."""
    model = nnx.merge(graphdef, params)
    x, y, mask = prepare(batch, key, task)
    keys = jax.random.split(key, samples)
    draws = jnp.stack([_predict(model, x, None, k, task.kind) for k in keys], 1)  # y unknown: through p
    observed = 1.0 - mask
    shown = observed[:, None] * y[:, None] + mask[:, None] * draws  # observed pixels kept as given
    condition = jnp.where(observed > 0, y, 0.25)[:, None]  # unobserved shown grey
    return jnp.concatenate([condition, shown, y[:, None]], axis=1)


def drawings(graphdef, task, val_split):
    """Jitted drawings for TensorBoard at each evaluation: reconstructions and samples (or completions)."""
    few = {"image": val_split.images[:8], "label": val_split.labels[:8]}
    recon = jax.jit(lambda p, k: reconstructions(graphdef, p, few, k, task=task))
    if task.condition == "quadrants":
        second = ("val/completions", jax.jit(lambda p, k: completions(graphdef, p, few, k, task=task)))
    else:
        second = ("val/samples", jax.jit(lambda p, k: class_samples(graphdef, p, k, task=task)))

    def draw(params, key):
        out = {"val/reconstructions": recon(params, key).swapaxes(0, 1)} if kind(task.kind).recognition else {}
        out[second[0]] = second[1](params, key)
        return jax.device_get(out)

    return draw
