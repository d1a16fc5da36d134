"""Colourisation of predictions and targets, and figures."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps

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
