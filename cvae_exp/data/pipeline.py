"""From raw uint8 arrays to training batches: splits, binarization, conditions and masks.

Host side (numpy, once): flatten, carve the validation split, binarize what must stay fixed, and
hand out batches by step number, so the data order is a pure function of (seed, step) and a resumed
run sees exactly the batches an uninterrupted run would. Device side (inside the jitted step):
dynamic binarization (or, for the continuous Gaussian, uniform dequantization), the condition x and the
mask of scored pixels. Sizes, classes and masks come from the data's geometry (`cvae_exp.data.geometry`).
An image is flattened channels last: dimension (row * width + column) * channels + channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from cvae_exp.data.geometry import Geometry
from cvae_exp.errors import UserError

BINARIZE_SEED = 42  # data.binarize_seed's default: the seed of the fixed draw of Shu et al. (2017), RuiShu/bcde


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, height * width * channels]; 0/255 when binarized on the host
    labels: np.ndarray  # int32 [N]
    shuffle: bool = True  # training: a new order every epoch; False: every epoch in the split's own order


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    dynamic: bool  # train images are grayscale and binarized afresh in every step
    geometry: Geometry  # of every image in the three splits


def _bernoulli_u8(images: np.ndarray, seed) -> np.ndarray:
    """One Bernoulli draw per pixel with p = intensity / 255, as 0/255 (deterministic in `seed`)."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(images.shape, dtype=np.float32) * 255.0 < images, 255, 0).astype(np.uint8)


def make_splits(
    raw,
    *,
    val_size: int,
    split_seed: int,
    binarize: str,
    binarize_seed: int = BINARIZE_SEED,
    val_from: str = "random",
    val_holdout: bool = True,
    shuffle: bool = True,
) -> Splits:
    """Train/val/test as flat uint8 arrays; val is carved from train with `split_seed`, or (val_from="last")
    is the last `val_size` digits of the training file and train the rest in file order (yburda/iwae
    datasets.py: 59,600 / 400). val_holdout=False trains on the val digits too (nbip/IWAE trains on all
    60,000: val is then a monitor of fit, not held out); shuffle=False keeps the training order in every epoch.

    static and dynamic score the same targets: one fixed Bernoulli draw per image, seeded by
    `binarize_seed` (the 60,000 training digits drawn once before the split, the test digits once), so
    every run and every model with that seed is evaluated on identical val and test pixels. static also
    trains on that draw (the protocol of Shu et al. 2017); dynamic trains on the grayscale digits, redrawn
    in every step. threshold: every pixel above one half is 1 (deterministic, no pixel noise: an easier
    task). none: grayscale targets.
    """
    n_train = len(raw.train_images)
    if val_size >= n_train:
        raise UserError(
            f"data.val_size={val_size} leaves no training data: the training split holds {n_train} images; "
            f"set data.val_size below that (a tenth would be {max(1, n_train // 10)})."
        )
    if val_from == "last":
        order = np.concatenate([np.arange(n_train - val_size, n_train), np.arange(n_train - val_size)])
    else:
        order = np.random.default_rng(split_seed).permutation(n_train)
    flat = raw.train_images.reshape(n_train, -1)
    test_images = raw.test_images.reshape(len(raw.test_images), -1)
    labels = raw.train_labels.astype(np.int32)
    test_labels = raw.test_labels.astype(np.int32)
    if binarize == "threshold":
        flat, test_images = (np.where(a > 127, 255, 0).astype(np.uint8) for a in (flat, test_images))
    drawn = flat
    if binarize in ("static", "dynamic"):
        drawn = _bernoulli_u8(flat, [binarize_seed, 0])
        test_images = _bernoulli_u8(test_images, [binarize_seed, 1])
    train_images = drawn if binarize == "static" else flat
    trained = order[val_size:] if val_holdout else np.concatenate([order[val_size:], order[:val_size]])
    train = Split(train_images[trained], labels[trained], shuffle)
    val = Split(drawn[order[:val_size]], labels[order[:val_size]])
    test = Split(test_images, test_labels)
    return Splits(train, val, test, dynamic=binarize == "dynamic", geometry=raw.geometry)


class BatchSampler:
    """Shuffled mini-batches by global step: epoch e uses permutation(seed, e), no state to save."""

    def __init__(self, split: Split, batch_size: int, seed: int):
        if batch_size > len(split.images):
            raise UserError(
                f"trainer.batch_size={batch_size} is larger than the training split ({len(split.images)} images)."
            )
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.steps_per_epoch = len(split.images) // batch_size
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        """The shuffled indices of one epoch; step s uses order(s // steps_per_epoch) in slices of batch_size.
        An unshuffled split (data.shuffle=false) is visited in its own order in every epoch."""
        if not self.split.shuffle:
            return np.arange(len(self.split.images))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.split.images))

    def indices(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.order(epoch)
        return self._order[pos * self.batch_size : (pos + 1) * self.batch_size]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        return {"image": self.split.images[idx], "label": self.split.labels[idx]}


class SeedSampler:
    """The batches of K runs with the given seeds (seed..seed+K-1 of trainer.num_seeds, or a vmap group's
    members', repeats allowed), stacked on a leading axis: seed s draws exactly what a single run with seed
    s would."""

    def __init__(self, split: Split, batch_size: int, seeds: list[int]):
        self.samplers = [BatchSampler(split, batch_size, s) for s in seeds]
        self.steps_per_epoch = self.samplers[0].steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """The K seeds' orders of one epoch, [K, N]."""
        return np.stack([s.order(epoch) for s in self.samplers])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        batches = [s.batch(step) for s in self.samplers]
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def make_sampler(split: Split, batch_size: int, seeds: list[int]):
    """One run's batches (one seed), or the stacked batches of vmapped runs, one per seed."""
    if len(seeds) == 1:
        return BatchSampler(split, batch_size, seeds[0])
    return SeedSampler(split, batch_size, seeds)


def eval_batches(split: Split, batch_size: int):
    """Fixed-size batches covering the split; the last one padded, with weights 0 on the padding."""
    n = len(split.images)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        weight = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        yield {"image": split.images[idx], "label": split.labels[idx], "weight": weight}


# ----------------------------------------------------------------------------- device side


# Quadrants in the order they are given, as (row half, column half): 0 top / left, 1 bottom / right.
# left_first is the layout of Pyro's reproduction of Sohn et al., whose numbers match the paper's Table 1
# (1: bottom-left; 2: left half; 3: all but bottom-right); top_first (1: top-left; 2: top half; 3: all but
# bottom-right) is the alternative. Measured here on MNIST: the baseline NN scores about 108 nats with the
# bottom-left quadrant given, 128 with the top-left one.
TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT = (0, 0), (0, 1), (1, 0)
QUADRANT_LAYOUTS = {
    "left_first": (BOTTOM_LEFT, TOP_LEFT, TOP_RIGHT),
    "top_first": (TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT),
}


def quadrant_mask(n_given: int, layout: str, geometry: Geometry) -> np.ndarray:
    """1 on the observed dimensions [height * width * channels]: the first `n_given` quadrants of `layout`
    (every channel of a pixel alike). Quadrants are halves of an even height and width."""
    h, w = geometry.height // 2, geometry.width // 2
    given = np.zeros((geometry.height, geometry.width), np.float32)
    for r, c in QUADRANT_LAYOUTS[layout][:n_given]:
        given[r * h : (r + 1) * h, c * w : (c + 1) * w] = 1.0
    if geometry.channels > 1:
        given = np.repeat(given[..., None], geometry.channels, axis=-1)
    return given.reshape(geometry.dims)


def condition_dim(condition: str, geometry: Geometry) -> int:
    return {"none": 0, "label": geometry.classes, "quadrants": geometry.dims}[condition]


def prepare_arrays(
    batch,
    key,
    *,
    geometry: Geometry,
    dynamic: bool,
    condition: str,
    n_given: int = 1,
    layout: str = "left_first",
    omission_rate: float = 0.0,
    dequantize: bool = False,
):
    """(x, y, mask) from a raw batch, inside jit.

    y: the target in [0, 1], pixel value / 255 (dequantize: (value + u) / 256 with u uniform in [0, 1), the
    continuous Gaussian's data); x: the condition (one-hot label, nothing, or the image with unobserved
    pixels set to -1 so that 'unobserved' differs from 'black'); mask: 1 on the scored dimensions.
    """
    key_bin, key_omit = jax.random.split(key)
    if dequantize:
        image = batch["image"].astype(jnp.float32)
        y = (image + jax.random.uniform(key_bin, image.shape, jnp.float32)) / 256.0
    else:
        y = batch["image"].astype(jnp.float32) / 255.0
    if dynamic:
        y = jax.random.bernoulli(key_bin, y).astype(jnp.float32)
    b = y.shape[0]
    if condition == "label":
        return jax.nn.one_hot(batch["label"], geometry.classes), y, jnp.ones_like(y)
    if condition == "none":
        return jnp.zeros((b, 0), jnp.float32), y, jnp.ones_like(y)
    given = _given(n_given, layout, geometry)
    observed = jnp.broadcast_to(given, y.shape)
    if omission_rate > 0.0:
        observed = observed * (1.0 - _omission(key_omit, b, omission_rate, geometry))
    x = jnp.where(observed > 0, y, -1.0)
    return x, y, jnp.broadcast_to(1.0 - given, y.shape)


def prepare(batch, key, task, train: bool = False):
    """`prepare_arrays` as a task (`steps.Task`) asks for it: its geometry, condition and quadrants, its
    dequantization, and in training (`train`) its dynamic binarization and omitted squares; evaluations and
    drawings see neither."""
    return prepare_arrays(
        batch,
        key,
        geometry=task.geometry,
        dynamic=task.dynamic and train,
        condition=task.condition,
        n_given=task.n_given,
        layout=task.layout,
        omission_rate=task.omission_rate if train else 0.0,
        dequantize=task.dequantize,
    )


def _given(n_given, layout: str, geometry: Geometry) -> jax.Array:
    """The observed-dimension mask [dims]: a constant for a Python int, or (a vmap group whose members differ
    in data.n_given) a traced int that picks its row of the masks for 0..3 quadrants, the mask as data."""
    if isinstance(n_given, int):
        return jnp.asarray(quadrant_mask(n_given, layout, geometry))
    masks = np.stack([quadrant_mask(n, layout, geometry) for n in range(len(QUADRANT_LAYOUTS[layout]) + 1)])
    return jnp.asarray(masks)[n_given]


def _omission(key, b: int, rate: float, geometry: Geometry) -> jax.Array:
    """Per example, with probability `rate`, a random rectangle of a quarter of the height and of the width
    (7 x 7 on MNIST) to blank out of the condition, in every channel."""
    k_on, k_r, k_c = jax.random.split(key, 3)
    height, width = geometry.height, geometry.width
    size_r, size_c = height // 4, width // 4
    on = jax.random.bernoulli(k_on, rate, (b, 1, 1))
    r0 = jax.random.randint(k_r, (b, 1, 1), 0, height - size_r + 1)
    c0 = jax.random.randint(k_c, (b, 1, 1), 0, width - size_c + 1)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    square = (rows >= r0) & (rows < r0 + size_r) & (cols >= c0) & (cols < c0 + size_c) & on
    square = jnp.broadcast_to(square[..., None], (b, height, width, geometry.channels))
    return square.reshape(b, geometry.dims).astype(jnp.float32)
