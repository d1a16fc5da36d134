"""Colourisation of predictions and targets, and figures."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOR = np.array([0, 0, 0], dtype=np.uint8)


def label_palette(num_classes: int) -> np.ndarray:
    """A fixed ``(num_classes, 3)`` uint8 palette (the PASCAL VOC bit-interleaving scheme)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for k in range(num_classes):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[k] = (r, g, b)
    return palette


def colorize_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Colour a ``(H, W)`` label map; ignored or out-of-range pixels are black. Returns ``(H, W, 3)`` uint8."""
    palette = label_palette(num_classes + 1)[1:]
    valid = (labels >= 0) & (labels < num_classes)
    out = np.zeros(labels.shape + (3,), dtype=np.uint8)
    out[valid] = palette[labels[valid]]
    return out


def colorize_probability(prob: np.ndarray) -> np.ndarray:
    """Grey-scale picture of a ``(H, W)`` map in [0, 1]; values outside are clipped. Returns ``(H, W, 3)`` uint8."""
    grey = (np.clip(prob, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def colorize_normals(normals: np.ndarray) -> np.ndarray:
    """Map ``(3, H, W)`` unit normals to RGB with the dataset encoding ``(n + 1) / 2 * 255``. Returns ``(H, W, 3)`` uint8."""
    rgb = (np.clip(normals, -1.0, 1.0) + 1.0) / 2.0 * 255.0
    return rgb.transpose(1, 2, 0).round().astype(np.uint8)


def colorize_depth(depth: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Colour a ``(H, W)`` depth map, scaled to its valid range; invalid (<= 0) pixels are black."""
    valid = depth > 0
    out = np.zeros(depth.shape + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    lo, hi = depth[valid].min(), depth[valid].max()
    scaled = (depth - lo) / max(hi - lo, 1e-6)
    rgb = colormaps[cmap](np.clip(scaled, 0, 1))[..., :3]
    out[valid] = (rgb[valid] * 255).round().astype(np.uint8)
    return out


# ------------------------------------------------------------------ picture grids

#: Pixels between the cells of a :func:`prediction_grid`.
GRID_GAP = 4
#: Pixels above and below a title's text (and at least on either side).
TITLE_PAD = 2
#: Cells per row of a :func:`prediction_grid` unless told otherwise.
GRID_MAX_COLUMNS = 4
_BACKGROUND = 255
_TITLE_COLOR = (0, 0, 0)


@functools.cache
def _title_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's built-in font (no file lookup): FreeType at about 10 px where Pillow has FreeType."""
    return ImageFont.load_default()


def _text_size(text: str) -> tuple[int, int]:
    left, top, right, bottom = _title_font().getbbox(text)
    return right - left, bottom


@dataclass(frozen=True)
class GridLayout:
    """Where :func:`prediction_grid` puts its cells.

    Attributes:
        height, width: the picture's size.
        columns, rows: the grid's shape; cells fill it row by row.
        title_height: rows of the title band above every cell's picture.
        cell_height, cell_width: the picture area of a cell (the largest panel, or the widest title).
        boxes: ``(top, left)`` of every panel, in the order given; a panel is centred horizontally
            in its cell, under its title.
    """

    height: int
    width: int
    columns: int
    rows: int
    title_height: int
    cell_height: int
    cell_width: int
    boxes: tuple[tuple[int, int], ...]


def grid_layout(shapes: Sequence[tuple[int, int]], titles: Sequence[str], columns: int | None = None) -> GridLayout:
    """The layout of a grid of panels of ``(h, w)`` ``shapes`` titled ``titles``.

    Args:
        shapes: ``(h, w)`` of every panel.
        titles: one title per panel.
        columns: cells per row (default: every panel in one row up to :data:`GRID_MAX_COLUMNS`,
            else the fewest rows of at most that many, balanced: 5 panels are 3 + 2).
    """
    n = len(shapes)
    if n == 0 or len(titles) != n:
        raise ValueError(f"grid_layout: {n} panel(s) and {len(titles)} title(s); need the same, at least one")
    if columns is None:
        rows = math.ceil(n / GRID_MAX_COLUMNS)
        columns = math.ceil(n / rows)
    elif columns < 1:
        raise ValueError(f"grid_layout: columns must be >= 1, got {columns}")
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    text = [_text_size(t) for t in titles]
    title_height = max(h for _, h in text) + 2 * TITLE_PAD
    cell_height = max(h for h, _ in shapes)
    cell_width = max(max(w for _, w in shapes), max(w for w, _ in text) + 2 * TITLE_PAD)
    boxes = tuple(
        (
            (i // columns) * (title_height + cell_height + GRID_GAP) + title_height,
            (i % columns) * (cell_width + GRID_GAP) + (cell_width - w) // 2,
        )
        for i, (_, w) in enumerate(shapes)
    )
    height = rows * (title_height + cell_height) + (rows - 1) * GRID_GAP
    width = columns * cell_width + (columns - 1) * GRID_GAP
    return GridLayout(height, width, columns, rows, title_height, cell_height, cell_width, boxes)


def image_to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A ``(3, H, W)`` float image in [0, 1] as ``(H, W, 3)`` uint8: ``round(255 x)``, values outside clipped."""
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(array.shape)}")
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)


def prediction_grid(
    image: torch.Tensor | np.ndarray,
    panels: Mapping[str, np.ndarray],
    columns: int | None = None,
    image_title: str = "input",
) -> np.ndarray:
    """One picture of an input and its predictions: titled panels side by side (a grid if many).

    The input comes first, then ``panels`` in their order; every panel keeps its pixels (no
    scaling). The layout is :func:`grid_layout`'s: white background, each title in black
    above its panel.

    Args:
        image: ``(3, H, W)`` float input in [0, 1] (de-normalised), tensor or array.
        panels: title -> ``(h, w, 3)`` uint8 picture (e.g. a task's ``colorize`` of a prediction),
            usually ``(H, W, 3)``.
        columns: cells per row (see :func:`grid_layout`).
        image_title: the title of the input panel.

    Returns:
        ``(H', W', 3)`` uint8, ``H' >= H`` and ``W' >= W`` (see :func:`grid_layout` for the sizes).
    """
    pictures = [image_to_uint8(image)]
    for title, panel in panels.items():
        panel = np.asarray(panel)
        if panel.dtype != np.uint8 or panel.ndim != 3 or panel.shape[2] != 3:
            raise ValueError(f"panel {title!r}: expected (h, w, 3) uint8, got {panel.dtype} {tuple(panel.shape)}")
        pictures.append(panel)
    titles = [image_title, *panels]
    layout = grid_layout([p.shape[:2] for p in pictures], titles, columns)
    canvas = np.full((layout.height, layout.width, 3), _BACKGROUND, dtype=np.uint8)
    for (top, left), picture in zip(layout.boxes, pictures):
        canvas[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
    out = Image.fromarray(canvas)
    draw = ImageDraw.Draw(out)
    font = _title_font()
    for i, title in enumerate(titles):
        text_width, _ = _text_size(title)
        cell_top = (i // layout.columns) * (layout.title_height + layout.cell_height + GRID_GAP)
        cell_left = (i % layout.columns) * (layout.cell_width + GRID_GAP)
        draw.text((cell_left + (layout.cell_width - text_width) // 2, cell_top + TITLE_PAD), title, fill=_TITLE_COLOR, font=font)
    return np.asarray(out)
