"""Image grids from what the model draws (numpy, on the host): images of a geometry tiled into one picture
with a grey border between them (`tile`), and a white margin naming each row's class (`label_rows`). The
same grids go to TensorBoard and to cvae-sample's PNGs: [H, W] for grayscale data, [H, W, 3] for RGB.
"""

from __future__ import annotations

import functools

import numpy as np

from cvae_exp.data.geometry import Geometry

BORDER = 0.5  # the grey between images
LABEL_GAP = 2  # pixels of margin on either side of a row's name


def tile(images: np.ndarray, geometry: Geometry, pad: int = 1) -> np.ndarray:
    """[rows, cols, dims] images in [0, 1] -> one grid with a `pad`-pixel grey border around every image."""
    rows, cols = images.shape[:2]
    height, width, channels = geometry.shape
    grid = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, channels), BORDER, np.float32)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[top : top + height, left : left + width] = images[r, c].reshape(height, width, channels)
    return grid[..., 0] if channels == 1 else grid


@functools.cache
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # a Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def _font_size(geometry: Geometry) -> int:
    return max(6, min(14, geometry.height))


def label_width(names: list[str], geometry: Geometry) -> int:
    """The width of the margin that `label_rows` adds for these names."""
    font = _font(_font_size(geometry))
    return int(np.ceil(max((font.getlength(n) for n in names), default=0.0))) + 2 * LABEL_GAP


def label_rows(grid: np.ndarray, names: list[str], geometry: Geometry, pad: int = 1) -> np.ndarray:
    """`grid` (a `tile` of one row per name) with a white margin on its left, each row's name in black beside it."""
    from PIL import Image, ImageDraw

    width = label_width(names, geometry)
    margin = Image.new("L", (width, grid.shape[0]), 255)
    draw, font = ImageDraw.Draw(margin), _font(_font_size(geometry))
    for r, name in enumerate(names):
        middle = pad + r * (geometry.height + pad) + geometry.height / 2
        try:
            draw.text((LABEL_GAP, middle), name, fill=0, font=font, anchor="lm")
        except ValueError:  # the bitmap font takes no anchor: its top-left corner, about half its height up
            draw.text((LABEL_GAP, middle - 5), name, fill=0, font=font)
    text = np.asarray(margin, np.float32) / 255.0
    if grid.ndim == 3:
        text = np.repeat(text[..., None], grid.shape[-1], axis=-1)
    return np.concatenate([text, grid], axis=1)
