"""Datasets the tests write themselves, in the layouts a researcher brings: an image folder (the `datasets`
imagefolder layout: train/ and test/, one sub-folder per class, PNG files) and a Hub-layout Parquet folder
with other column names. The images are easy to learn: a class-dependent coloured block and stripe, jittered,
with faint noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("blue", "green", "red")  # sorted, as datasets numbers an image folder's classes
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def shapes(labels: np.ndarray, height: int, width: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, height, width, channels]: class c puts a block in one of three places, in the colour it is named
    after (or a grey level of its own), and a stripe in column 2 + 3c."""
    images = np.zeros((len(labels), height, width, channels), np.float32)
    bh, bw = max(2, height // 3), max(2, width // 3)
    for i, c in enumerate(labels):
        r0, c0 = (height - bh) * (c % 2), (width - bw) * c // 2
        r, col = (min(start + shift, size - extent) for start, shift, size, extent in
                  zip((r0, c0), rng.integers(0, 2, size=2), (height, width), (bh, bw), strict=True))  # fmt: skip
        images[i, r : r + bh, col : col + bw] = COLOURS[CLASSES[c]] if channels == 3 else [0.35 + 0.3 * c]
        images[i, :, min(width - 1, 2 + 3 * int(c))] = 0.8
    images += rng.normal(0.0, 0.04, images.shape).astype(np.float32)
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_image_folder(
    root: Path, *, height: int = 32, width: int = 32, n_train: int = 240, n_test: int = 60, seed: int = 0
) -> Path:
    """<root>/{train,test}/<class>/<i>.png, RGB, the classes of CLASSES."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % len(CLASSES)
        for i, (label, image) in enumerate(zip(labels, shapes(labels, height, width, 3, rng), strict=True)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def write_parquet_set(
    root: Path,
    *,
    height: int = 20,
    width: int = 36,
    n_train: int = 240,
    n_test: int = 60,
    image_column: str = "img",
    label_column: str = "fine_label",
    seed: int = 0,
) -> Path:
    """<root>/data/{train,test}-00000-of-00001.parquet: grayscale height x width images under `image_column`,
    integer class labels (no ClassLabel names) under `label_column`, and a second integer column beside them."""
    import datasets

    features = datasets.Features(
        {image_column: datasets.Image(), label_column: datasets.Value("int64"), "coarse": datasets.Value("int64")}
    )
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 3
        images = shapes(labels, height, width, 1, rng)[..., 0]
        rows = {image_column: list(images), label_column: labels.tolist(), "coarse": (labels // 2).tolist()}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root
