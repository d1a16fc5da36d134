"""The numeric codes of the community prediction files (ASTMT / MTI-Net / ATRC / InvPT, SEISM).

Writing truncates like the reference code's ``astype(np.uint8)``: a probability ``p`` is stored
as ``floor(255 p)`` and a unit vector component ``n`` as ``floor((n + 1) 255 / 2)``; 16-bit depth
PNGs hold millimetres rounded to the nearest one.
"""

from __future__ import annotations

import numpy as np

DEPTH_PNG_SCALE = 1000.0
"""16-bit depth PNGs store millimetres: ``metres = value / DEPTH_PNG_SCALE``."""

UINT16_MAX = 65535


def probability_codes(prob: np.ndarray) -> np.ndarray:
    """uint8 ``floor(255 p)`` of probabilities (any shape)."""
    return np.floor(np.clip(prob.astype(np.float32) * np.float32(255), 0, 255)).astype(np.uint8)


def quantize_probabilities(prob: np.ndarray) -> np.ndarray:
    """float32 ``floor(255 p) / 255`` (any shape): what a saved probability reads back as."""
    scaled = np.clip(np.asarray(prob, dtype=np.float32) * np.float32(255), 0, 255)
    return np.floor(scaled).astype(np.float32) / np.float32(255)


def direction_codes(vectors: np.ndarray) -> np.ndarray:
    """uint8 ``floor((n + 1) 255 / 2)`` of unit vectors (channels last)."""
    scaled = (vectors.astype(np.float32) + np.float32(1)) * np.float32(255) / np.float32(2)
    return np.floor(np.clip(scaled, 0, 255)).astype(np.uint8)


def decode_directions(codes: np.ndarray) -> np.ndarray:
    """float32 ``2 v / 255 - 1``, as the ground-truth readers decode normals PNGs."""
    return np.float32(2.0) * codes.astype(np.float32) / np.float32(255.0) - np.float32(1.0)


def depth_codes(depth: np.ndarray) -> np.ndarray:
    """uint16 millimetres of depths in metres.

    Raises:
        ValueError: a depth beyond 65.535 m.
    """
    mm = np.rint(depth.astype(np.float64) * DEPTH_PNG_SCALE)
    if mm.size and mm.max() > UINT16_MAX:
        raise ValueError(
            f"depth up to {depth.max():.3f} m does not fit a 16-bit PNG in millimetres (max {UINT16_MAX / DEPTH_PNG_SCALE} m); "
            "save depth as .npy"
        )
    return mm.astype(np.uint16)
