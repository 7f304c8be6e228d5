"""The binarization protocols of data.binarize: what is trained on and what is scored.

static and dynamic must score the very same pixels (one fixed Bernoulli draw per image, seeded by
data.binarize_seed), so their validation numbers compare; static trains on that draw, dynamic on the
grayscale digits; threshold has no randomness at all.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cvae_exp.data.geometry import MNIST
from cvae_exp.data.pipeline import BINARIZE_SEED, make_splits


@pytest.fixture(scope="module")
def raw():
    rng = np.random.default_rng(3)
    return SimpleNamespace(
        train_images=rng.integers(0, 256, (600, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 10, 600),
        test_images=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
        test_labels=rng.integers(0, 10, 200),
        geometry=MNIST,
    )


def splits(raw, binarize, seed=BINARIZE_SEED, split_seed=0):
    return make_splits(raw, val_size=100, split_seed=split_seed, binarize=binarize, binarize_seed=seed)


def test_static_and_dynamic_score_the_same_fixed_draw(raw):
    static, dynamic = splits(raw, "static"), splits(raw, "dynamic")
    for name in ("val", "test"):
        a, b = getattr(static, name).images, getattr(dynamic, name).images
        np.testing.assert_array_equal(a, b)
        assert set(np.unique(a)) <= {0, 255}
    assert static.dynamic is False and dynamic.dynamic is True
    assert set(np.unique(static.train.images)) <= {0, 255}  # static trains on the draw...
    assert len(np.unique(dynamic.train.images)) > 2  # ...dynamic on grayscale, redrawn in every step


def test_the_draw_is_a_bernoulli_sample_of_the_intensities_and_depends_on_the_seed(raw):
    first, again, other = splits(raw, "static"), splits(raw, "static"), splits(raw, "static", seed=7)
    np.testing.assert_array_equal(first.test.images, again.test.images)
    assert not np.array_equal(first.test.images, other.test.images)
    p = raw.test_images.reshape(200, -1).astype(np.float64) / 255.0
    ones = first.test.images / 255.0
    assert abs(ones.mean() - p.mean()) < 0.01  # the expected share of ones
    assert np.all(ones[p == 0] == 0)  # a black pixel never turns on


def test_a_digit_keeps_its_draw_whatever_the_split(raw):
    """The 60,000 training digits are drawn before the split: a digit's pixels do not depend on split_seed."""
    a, b = splits(raw, "static", split_seed=0), splits(raw, "static", split_seed=1)
    rows = lambda s: {r.tobytes() for r in np.concatenate([s.train.images, s.val.images])}  # noqa: E731
    assert rows(a) == rows(b)


def test_threshold_has_no_randomness(raw):
    t = splits(raw, "threshold")
    np.testing.assert_array_equal(t.test.images, np.where(raw.test_images.reshape(200, -1) > 127, 255, 0))
    np.testing.assert_array_equal(t.test.images, splits(raw, "threshold", seed=7).test.images)
