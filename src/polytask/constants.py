"""Constants shared across polytask: the ignore label of targets and the ImageNet normalisation."""

from __future__ import annotations

IGNORE_INDEX = 255
"""Target value of pixels (or entries) that no loss or metric counts."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of RGB images in [0, 1] that inputs are normalised with."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of RGB images in [0, 1] that inputs are normalised with."""
