"""From a `datasets` DatasetDict (a Hub dataset, a Parquet folder, an image folder) to uint8 arrays, once.

The image and label columns are the ones named (`data.image_column`, `data.label_column`) or found by their
feature types (the one `Image` column, the one `ClassLabel` column; else columns called `image` and `label`).
Every image becomes uint8 [H, W, C], grayscale (C = 1) or RGB (C = 3; a dataset with any colour image is RGB,
its grayscale images repeated over the three channels; alpha is dropped); all must have one size unless
`data.resize=[H, W]` resizes them (bilinear). The geometry is read off the result. Bad data is refused with
one sentence naming the file (or row) and what is wrong.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cvae_exp.data.geometry import Geometry, numbered
from cvae_exp.errors import UserError

GREY_MODES = {"1", "L", "LA", "La"}  # decoded as one channel; every other 8-bit mode as RGB
MAX_CLASSES = 10_000  # integer labels without ClassLabel names: 0..max, up to this many classes


@dataclass(frozen=True)
class Columns:
    """How a dataset's table is read: data.image_column, data.label_column, data.resize (height, width)."""

    image: str | None = None
    label: str | None = None
    resize: tuple[int, int] | None = None

    def fingerprint(self) -> tuple:
        return (self.image, self.label, self.resize)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def pick_columns(
    types: dict[str, str], where: str, file: str, columns: Columns, needs_labels: bool = False
) -> tuple[str, str | None]:
    """(image column, label column or None) of a table whose columns have these feature types ("Image",
    "ClassLabel", "Value", ...); `file` names the table in the one sentence that refuses it."""
    listed = ", ".join(types) or "none"

    def named(key: str, column: str) -> str:
        if column not in types:
            raise UserError(f"{key}={column} is not a column of {where} ({file} has {listed}).")
        return column

    def found(kind: str, fallback: str, key: str) -> str | None:
        typed = [c for c, t in types.items() if t == kind]
        if len(typed) > 1:
            raise UserError(f"{where} has several {kind} columns in {file} ({', '.join(typed)}): set {key} to one.")
        return typed[0] if typed else (fallback if fallback in types else None)

    image = named("data.image_column", columns.image) if columns.image else found("Image", "image", "data.image_column")
    if image is None:
        raise UserError(
            f"{where} has no 'image' column and no Image feature in {file} ({listed}): set data.image_column."
        )
    label = (
        named("data.label_column", columns.label)
        if columns.label
        else found("ClassLabel", "label", "data.label_column")
    )
    if label is None and needs_labels:
        raise UserError(
            f"{where} has no 'label' column and no ClassLabel feature in {file} ({listed}), so its images have no "
            "classes: set data.label_column, or train with data.condition=none or quadrants."
        )
    return image, label


def feature_types(features) -> dict[str, str]:
    """A datasets.Features as {column: feature type name}."""
    return {name: type(feature).__name__ for name, feature in features.items()}


def open_image(cell: dict, where: Callable[[], str]) -> Image.Image:
    """One image cell of the Hub's Image feature, decoded; undecodable bytes are refused naming `where()`, which
    is only worked out then (naming a row opens its Parquet file's metadata: far too slow for every row)."""
    try:
        image = Image.open(io.BytesIO(cell["bytes"]) if cell["bytes"] is not None else cell["path"])
        image.load()
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for broken bytes
        raise UserError(f"{where()} is not a decodable image ({first_line(err)}).") from None
    return image


@dataclass
class _Size:
    """The first image's size, to which every other must be equal (without data.resize)."""

    where: str
    columns: Columns
    height: int = 0
    width: int = 0
    first: str = ""

    def check(self, image: Image.Image, name: Callable[[], str]) -> None:
        width, height = image.size
        if not self.first:
            self.height, self.width, self.first = height, width, name()
        elif (height, width) != (self.height, self.width):
            raise UserError(
                f"{self.where} holds images of different sizes: {name()} is {height}x{width} but {self.first} is "
                f"{self.height}x{self.width} (height x width); set data.resize=[H,W] to resize them all to one size."
            )


def _pixels(image: Image.Image, name: Callable[[], str], columns: Columns) -> np.ndarray:
    """uint8 [H, W] (grayscale) or [H, W, 3] of one decoded image, resized when asked."""
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise UserError(
            f"{name()} is a {image.mode} image (more than 8 bits per pixel); the models here score 8-bit pixels."
        )
    image = image.convert("L" if image.mode in GREY_MODES else "RGB")
    if columns.resize is not None:
        height, width = columns.resize
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image)


def decode_images(ds, column: str, where: str, split: str, row: Callable[[int], str], size: _Size) -> list[np.ndarray]:
    """Every image of a split's `column`, decoded with PIL in one pass (about twice as fast as datasets' numpy
    formatting); an undecodable image is refused naming its file (an image folder's) or its row."""
    import datasets

    if not isinstance(ds.features[column], datasets.Image):
        raise UserError(f"{where} stores {split} {column!r} as {type(ds.features[column]).__name__}, not as images.")
    cells = ds.cast_column(column, datasets.Image(decode=False)).with_format("arrow")[column].to_pylist()
    out = []
    for i, cell in enumerate(cells):

        def name(i=i, cell=cell) -> str:
            return cell["path"] if cell["bytes"] is None and cell["path"] else row(i)

        image = open_image(cell, lambda name=name: f"{where}: {name()}")
        if size.columns.resize is None:
            size.check(image, name)
        out.append(_pixels(image, lambda name=name: f"{where}: {name()}", size.columns))
    return out


def stack(images: list[np.ndarray], channels: int, shape: tuple[int, int]) -> np.ndarray:
    """uint8 [N, H, W, channels]; grayscale images repeated over the channels of an RGB dataset."""
    out = np.empty((len(images), *shape, channels), np.uint8)
    for i, image in enumerate(images):
        out[i] = image[..., None] if image.ndim == 2 else image
    return out


def check_labels(
    labels: np.ndarray, classes: int, where: str, split: str, rows: Callable[[int], str] | None = None
) -> None:
    """Integer labels in 0..classes-1 (checked in their own type: an int32 cast first would wrap 2**40 to 0)."""
    if labels.dtype.kind not in "iu":
        raise UserError(f"{where} {split} labels of type {labels.dtype}, not integers 0..{classes - 1}.")
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        at = rows(int(bad[0])) if rows else f"row {bad[0]} of the {split} split"
        more = f" ({bad.size} such labels)" if bad.size > 1 else ""
        raise UserError(f"{where} a {split} label {labels[bad[0]]} at {at}, outside 0..{classes - 1}{more}.")


def class_count(splits: dict[str, np.ndarray], names: tuple[str, ...] | None, where: str, rows) -> int:
    """The classes: ClassLabel's names where the data has them, else 0..the largest label (at most MAX_CLASSES)."""
    if names is not None:
        classes = len(names)
    else:
        top = max((int(v.max()) for v in splits.values() if v.size and v.dtype.kind in "iu"), default=-1)
        classes = min(top + 1, MAX_CLASSES)
    for split, labels in splits.items():
        check_labels(labels, max(classes, 1), f"{where} has", split, rows(split) if rows else None)
    return classes


def row_in_files(i: int, split: str, files: list) -> str:
    """Where row `i` of a split comes from: 'row 17 of <file>' when the split's Parquet files are known."""
    import pyarrow.parquet as pq

    start = 0
    for file in files:
        if file.suffix.lower() != ".parquet":
            break
        n = pq.ParquetFile(file).metadata.num_rows
        if i < start + n:
            return f"row {i - start} of {file}"
        start += n
    return f"row {i} of the {split} split"


def decode_dataset(dd, where: str, columns: Columns, files: Callable[[str], list]) -> dict:
    """{train_images, train_labels, test_images, test_labels (absent without a test split), geometry} of a
    DatasetDict; `files(split)` lists a split's Parquet files, to name a row's file."""
    import datasets

    if "train" not in dd:
        raise UserError(f"{where} has no 'train' split (found: {', '.join(dd) or 'none'}).")
    splits = [s for s in ("train", "test") if s in dd]
    first = dd["train"]
    file = (files("train") or [None])[0]
    image_col, label_col = pick_columns(
        feature_types(first.features), where, f"{file}" if file else "its train split", columns
    )
    size = _Size(where, columns)
    images, labels = {}, {}
    for split in splits:
        ds = dd[split]
        missing = [c for c in (image_col, label_col) if c is not None and c not in ds.column_names]
        if missing:
            raise UserError(f"{where} has no {' or '.join(map(repr, missing))} column in its {split} split.")

        def row(i: int, split=split) -> str:
            return row_in_files(i, split, files(split))

        images[split] = decode_images(ds, image_col, where, split, row, size)
        if label_col is not None:
            feature = ds.features[label_col]
            if not isinstance(feature, datasets.ClassLabel) and not (
                isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
            ):
                raise UserError(
                    f"{where} holds {split} {label_col!r} values of type {feature}, not integer class labels."
                )
            labels[split] = np.asarray(ds.with_format("arrow")[label_col])  # as stored: checked before any cast
    names_feature = first.features[label_col] if label_col is not None else None
    names = tuple(names_feature.names) if isinstance(names_feature, datasets.ClassLabel) else None

    def rows(split: str):
        return lambda i: row_in_files(i, split, files(split))

    classes = class_count(labels, names, where, rows) if label_col is not None else 0
    channels = 3 if any(a.ndim == 3 for split in splits for a in images[split]) else 1
    shape = columns.resize or next((a.shape[:2] for split in splits for a in images[split]), (0, 0))
    out = {}
    for split in splits:
        out[f"{split}_images"] = stack(images[split], channels, tuple(shape))
        n = len(images[split])
        out[f"{split}_labels"] = labels[split].astype(np.int32) if label_col is not None else np.zeros(n, np.int32)
    class_names = (names or numbered(classes)) if classes else ()
    out["geometry"] = Geometry(int(shape[0]), int(shape[1]), channels, classes, tuple(class_names))
    return out
