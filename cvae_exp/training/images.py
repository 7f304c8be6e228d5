"""What the model draws: reconstructions, samples per class, quadrant completions.

Each drawing function returns [rows, cols, dims] values in [0, 1] (the decoder's means) and is a pure
function of (params, inputs, key); callers jit them. `drawings` makes TensorBoard's grids of them
(`cvae_exp.training.grids`), the class-conditional samples one row per class up to MAX_CLASS_ROWS,
labelled with the class names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cvae_exp.data.pipeline import prepare
from cvae_exp.models.distributions import mean_of, reparameterize
from cvae_exp.models.kinds import kind
from cvae_exp.training.grids import label_rows, tile

MAX_CLASS_ROWS = 20  # class-conditional samples in TensorBoard: the first this many classes, a row each
UNCONDITIONAL_ROWS = 10  # rows of samples without labels


def _predict(model, x, y, key, name: str) -> jax.Array:
    """One draw of y's mean: through q for a reconstruction (y given, kinds with q), through p otherwise."""
    if not kind(name).latent:
        return mean_of(model(x))
    if not kind(name).recognition or y is None:
        return mean_of(model.generate(reparameterize(key, model.prior(x)), x))
    out, _, _ = model(x, y, key)
    return mean_of(out)


def reconstructions(graphdef, params, batch, key, *, task) -> jax.Array:
    """Rows of (input, reconstruction) pairs: [n, 2, dims]."""
    model = nnx.merge(graphdef, params)
    x, y, _ = prepare(batch, key, task)
    return jnp.stack([y, _predict(model, x, y, key, task.kind)], axis=1)


def class_rows(task, cap: int) -> int:
    """Rows of class_samples: one per class up to `cap` with the label condition, else UNCONDITIONAL_ROWS."""
    return min(task.geometry.classes, cap) if task.condition == "label" else UNCONDITIONAL_ROWS


def class_samples(graphdef, params, key, *, task, rows: int, cols: int = 10) -> jax.Array:
    """[rows, cols, dims]: row c holds samples for label c (or unconditional samples without labels)."""
    model = nnx.merge(graphdef, params)
    labels = jnp.repeat(jnp.arange(rows), cols)
    classes = task.geometry.classes
    x = jax.nn.one_hot(labels, classes) if task.condition == "label" else jnp.zeros((len(labels), 0))
    return _predict(model, x, None, key, task.kind).reshape(rows, cols, -1)


def class_grid(samples, task) -> jax.Array:
    """A class_samples stack as a grid, its rows named by their classes when they are class-conditional."""
    grid = tile(samples, task.geometry)
    if task.condition != "label":
        return grid
    return label_rows(grid, list(task.geometry.class_names[: len(samples)]), task.geometry)


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
    """Jitted drawings for TensorBoard at each evaluation: {tag: grid} of reconstructions and samples (or
    completions), grids as `cvae_exp.training.grids.tile` makes them."""
    few = {"image": val_split.images[:8], "label": val_split.labels[:8]}
    recon = jax.jit(lambda p, k: reconstructions(graphdef, p, few, k, task=task))
    if task.condition == "quadrants":
        second = jax.jit(lambda p, k: completions(graphdef, p, few, k, task=task))
        tag, as_grid = "val/completions", lambda stack: tile(stack, task.geometry)
    else:
        rows = class_rows(task, MAX_CLASS_ROWS)
        second = jax.jit(lambda p, k: class_samples(graphdef, p, k, task=task, rows=rows))
        tag, as_grid = "val/samples", lambda stack: class_grid(stack, task)

    def draw(params, key):
        out = {}
        if kind(task.kind).recognition:
            out["val/reconstructions"] = tile(jax.device_get(recon(params, key)).swapaxes(0, 1), task.geometry)
        out[tag] = as_grid(jax.device_get(second(params, key)))
        return out

    return draw
