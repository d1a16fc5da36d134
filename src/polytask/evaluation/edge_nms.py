"""Edge non-maximum suppression of SEISM's ``read_one_cont_png`` input path, in NumPy.

SEISM reads a boundary probability map, estimates a boundary orientation from the second
derivatives of a triangle-smoothed copy, and suppresses every pixel that is not a maximum
across that orientation (Dollar's structured-edge NMS). The functions below re-implement
these steps from their published definitions, in single precision like the MATLAB/MEX
originals (only the smoothing is summed in float64 and then rounded to float32):

- :func:`conv_tri`: 2-D convolution with the separable triangle filter
  ``[1 .. r, r + 1, r .. 1] / (r + 1)^2``, the image padded by mirroring (edge pixel
  repeated);
- :func:`gradient2`: central differences ``(I[i + 1] - I[i - 1]) / 2`` inside, one-sided
  differences on the first and last row/column;
- :func:`edge_orientation`: ``O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi)`` of the
  smoothed map;
- :func:`edge_nms`: a pixel is zeroed when, for an offset ``d`` in ``[-r, r] \\ {0}`` along
  ``(cos O, sin O)``, the bilinearly interpolated map exceeds ``m`` times its value; then the
  ``s`` pixels nearest each image side are scaled down linearly to zero at the border.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Radius of the triangle filter smoothing the map before the orientation estimate.
ORIENTATION_SMOOTHING = 4
#: Interpolation clamp of the NMS: coordinates stay below ``size - CLAMP_MARGIN``.
CLAMP_MARGIN = 1.001


def conv_tri(image: np.ndarray, radius: int) -> np.ndarray:
    """Smooth with the separable triangle filter of the given integer radius.

    The 1-D filter is ``[1, 2, .., r, r + 1, r, .., 1] / (r + 1)^2``; the image is padded by
    mirroring with the edge pixel repeated (MATLAB ``'symmetric'``). The sums are taken in
    float64 and rounded once to float32.

    Args:
        image: ``(H, W)`` array.
        radius: filter radius ``r >= 0`` (0 returns a float32 copy).

    Returns:
        ``(H, W)`` float32 smoothed image.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    out = np.asarray(image, dtype=np.float64)
    if radius > 0:
        ramp = np.arange(1, radius + 2, dtype=np.float64)
        kernel = np.concatenate((ramp, ramp[-2::-1])) / (radius + 1) ** 2
        out = ndimage.correlate1d(out, kernel, axis=0, mode="reflect")
        out = ndimage.correlate1d(out, kernel, axis=1, mode="reflect")
    return out.astype(np.float32)


def gradient2(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numerical x (column) and y (row) gradients, as MATLAB ``gradient`` with unit spacing.

    Args:
        image: ``(H, W)`` float32 array with ``H, W >= 2``.

    Returns:
        ``(gx, gy)``, each ``(H, W)`` float32.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 2:
        raise ValueError(f"gradient2 expects a 2-D array of at least 2x2, got shape {image.shape}")
    half = np.float32(0.5)
    gx = np.empty_like(image)
    gx[:, 1:-1] = (image[:, 2:] - image[:, :-2]) * half
    gx[:, 0] = image[:, 1] - image[:, 0]
    gx[:, -1] = image[:, -1] - image[:, -2]
    gy = np.empty_like(image)
    gy[1:-1] = (image[2:] - image[:-2]) * half
    gy[0] = image[1] - image[0]
    gy[-1] = image[-1] - image[-2]
    return gx, gy


def edge_orientation(edges: np.ndarray, smoothing: int = ORIENTATION_SMOOTHING) -> np.ndarray:
    """Boundary normal orientation from the second derivatives of a smoothed copy.

    ``O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi)`` where ``Oxx, Oxy, Oyy`` are
    :func:`gradient2` derivatives of ``conv_tri(edges, smoothing)``. Where the quotient is
    undefined (``0 / 0``) the orientation is set to 0.

    Args:
        edges: ``(H, W)`` boundary map in [0, 1].
        smoothing: triangle filter radius.

    Returns:
        ``(H, W)`` float32 angles in ``[0, pi)``; the NMS compares along
        ``(cos O, sin O)`` in (column, row) coordinates.
    """
    ox, oy = gradient2(conv_tri(edges, smoothing))
    oxx, _ = gradient2(ox)
    oxy, oyy = gradient2(oy)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = oyy * np.sign(-oxy) / (oxx + np.float32(1e-5))
    angle = np.mod(np.arctan(ratio), np.float32(np.pi))
    return np.nan_to_num(angle, nan=0.0).astype(np.float32)


def _interpolate(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image`` at float32 (column ``x``, row ``y``) coordinates.

    Coordinates are clamped to ``[0, size - 1.001]`` so the 2x2 neighbourhood stays inside.
    """
    h, w = image.shape
    x_max = np.float32(w - CLAMP_MARGIN)
    y_max = np.float32(h - CLAMP_MARGIN)
    x = np.where(x < 0, np.float32(0), np.where(x.astype(np.float64) > w - CLAMP_MARGIN, x_max, x))
    y = np.where(y < 0, np.float32(0), np.where(y.astype(np.float64) > h - CLAMP_MARGIN, y_max, y))
    x0 = x.astype(np.int64)
    y0 = y.astype(np.int64)
    dx0 = x - x0.astype(np.float32)
    dy0 = y - y0.astype(np.float32)
    dx1 = np.float32(1) - dx0
    dy1 = np.float32(1) - dy0
    return (
        image[y0, x0] * dx1 * dy1
        + image[y0, x0 + 1] * dx0 * dy1
        + image[y0 + 1, x0] * dx1 * dy0
        + image[y0 + 1, x0 + 1] * dx0 * dy0
    )


def edge_nms(
    edges: np.ndarray,
    orientation: np.ndarray,
    radius: int = 1,
    border: int = 5,
    multiplier: float = 1.01,
) -> np.ndarray:
    """Suppress non-maxima across the boundary orientation, then fade out the image border.

    A non-zero pixel ``e`` at (column ``x``, row ``y``) is set to 0 when
    ``multiplier * e < E(x + d cos O, y + d sin O)`` for some ``d`` in
    ``[-radius, radius] \\ {0}``, ``E`` being the bilinearly interpolated input. Afterwards
    the pixel in column ``x < s`` (and ``W - 1 - x``) is multiplied by ``x / s``, then the
    pixel in row ``y < s`` (and ``H - 1 - y``) by ``y / s``, with
    ``s = min(border, W // 2, H // 2)``. All arithmetic is float32.

    Args:
        edges: ``(H, W)`` boundary map in [0, 1] (the unsmoothed prediction).
        orientation: ``(H, W)`` angles from :func:`edge_orientation`.
        radius: suppression radius ``r`` in pixels.
        border: width ``s`` of the faded border.
        multiplier: ``m``, the margin a neighbour must exceed to suppress a pixel.

    Returns:
        ``(H, W)`` float32 suppressed map.
    """
    edges = np.asarray(edges, dtype=np.float32)
    orientation = np.asarray(orientation, dtype=np.float32)
    if edges.shape != orientation.shape or edges.ndim != 2:
        raise ValueError(f"edges and orientation must be equal 2-D shapes, got {edges.shape} and {orientation.shape}")
    h, w = edges.shape
    out = edges.copy()
    rows, cols = np.nonzero(edges)
    value = edges[rows, cols] * np.float32(multiplier)
    theta = orientation[rows, cols]
    cos_o, sin_o = np.cos(theta), np.sin(theta)
    x = cols.astype(np.float32)
    y = rows.astype(np.float32)
    suppressed = np.zeros(value.shape, dtype=bool)
    for d in range(-radius, radius + 1):
        if d == 0:
            continue
        step = np.float32(d)
        suppressed |= value < _interpolate(edges, x + step * cos_o, y + step * sin_o)
    out[rows[suppressed], cols[suppressed]] = 0

    s = min(border, w // 2, h // 2)
    if s > 0:
        fade = np.arange(s, dtype=np.float32) / np.float32(s)
        col_scale = np.ones(w, dtype=np.float32)
        col_scale[:s] = fade
        col_scale[w - s :] = fade[::-1]
        row_scale = np.ones(h, dtype=np.float32)
        row_scale[:s] = fade
        row_scale[h - s :] = fade[::-1]
        out *= col_scale[None, :]
        out *= row_scale[:, None]
    return out


def seism_nms(edges: np.ndarray) -> np.ndarray:
    """The full SEISM preprocessing of a boundary map: orientation, NMS (r=1, s=5, m=1.01).

    Args:
        edges: ``(H, W)`` float boundary probabilities in [0, 1].

    Returns:
        ``(H, W)`` float32 thinned-by-suppression map, to be thresholded.
    """
    edges = np.asarray(edges, dtype=np.float32)
    return edge_nms(edges, edge_orientation(edges), radius=1, border=5, multiplier=1.01)
