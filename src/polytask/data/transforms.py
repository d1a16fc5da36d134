"""Joint transforms: applied consistently to the image and every task target of a sample.

A sample is the dict of the sample contract (docs/architecture.md); every transform takes and
returns such a dict. Keys are mapped to a *kind* that decides how a value is resized, padded and
flipped: ``image`` (bilinear), ``label`` (nearest, padded with 255: segmentation, saliency,
boundaries), ``direction`` (nearest, x negated by a flip: normals) and ``distance`` (nearest,
divided by the scale factor: depth). Each task states the kind of its target
(:attr:`polytask.tasks.Task.transform_kind`; see :func:`transform_kinds`); the image is always of
kind ``image``. Keys without a kind (``meta``, image-level targets) are left alone.

The training pipeline of ATRC / InvPT (:func:`train_transform`) runs on an unnormalised image in
[0, 255]: random scale in U[0.5, 2.0] -> random crop (retried so that no class of the
crop-balancing target, the semantic segmentation, covers 75 % of it) -> horizontal flip ->
photometric distortion -> ImageNet normalisation -> padding to the train size -> part targets
without any part made all-ignore. Evaluation (:func:`eval_transform`) normalises and pads only.
Random draws come from the given ``torch.Generator`` (or torch's global generator), so a pipeline
is deterministic given a seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from polytask.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from polytask.tasks import TargetKind, Task

SampleKind = Literal["image"] | TargetKind
Sample = dict[str, Any]


def transform_kinds(tasks: Iterable[Task]) -> dict[str, TargetKind]:
    """The kind of every dense task's target, by task name (image-level tasks are left out)."""
    return {task.name: task.transform_kind for task in tasks if task.transform_kind is not None}


def crop_balance_key(tasks: Iterable[Task]) -> str | None:
    """The target the random crop's class ratio is measured on: the first task that
    :attr:`~polytask.tasks.Task.balances_crops` (None: no such task, crops are not re-drawn)."""
    return next((task.name for task in tasks if task.balances_crops), None)


def empty_ignored_keys(tasks: Iterable[Task]) -> list[str]:
    """The targets made all-ignore when they hold no foreground class (:attr:`~polytask.tasks.Task.ignores_empty`)."""
    return [task.name for task in tasks if task.ignores_empty]


def _merge_kinds(kinds: Mapping[str, TargetKind]) -> dict[str, SampleKind]:
    return {"image": "image", **kinds}


def _dense_items(sample: Sample, kinds: Mapping[str, SampleKind]) -> list[tuple[str, SampleKind]]:
    return [(key, kinds[key]) for key in sample if key in kinds]


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[low, high]`` (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _chance(p: float, generator: torch.Generator | None) -> bool:
    return float(torch.rand((), generator=generator)) < p


def resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``(..., H, W)`` to ``(..., h, w)``, any dtype.

    Uses OpenCV's ``INTER_NEAREST`` index rule, ``src = floor(dst * (1 / (dst_size / src_size)))``
    in double precision, so labels land on exactly the pixels the reference loaders pick.
    """
    in_h, in_w = x.shape[-2:]
    out_h, out_w = size

    def index(n_in: int, n_out: int) -> torch.Tensor:
        inv = 1.0 / (n_out / n_in)
        idx = torch.floor(torch.arange(n_out, dtype=torch.float64) * inv).long()
        return idx.clamp_(max=n_in - 1).to(x.device)

    return x[..., index(in_h, out_h)[:, None], index(in_w, out_w)[None, :]]


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a float ``(C, H, W)`` tensor (half-pixel centres, no antialiasing: OpenCV ``INTER_LINEAR``)."""
    return F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False)[0]


class RandomScale:
    """Rescale the sample by a factor drawn from U[``scale_range``].

    The new size is ``(int(H * s), int(W * s))``; the image is resized bilinearly, targets by
    nearest neighbour, and depth values are divided by ``s`` (an object seen ``s`` times larger
    is ``s`` times closer). A factor of exactly 1 leaves the sample untouched.

    Args:
        scale_range: ``(low, high)`` of the uniform scale factor.
        generator: torch generator of the draws (default: torch's global one).
        kinds: the kind of every target, by key (see the module docstring; :func:`transform_kinds`).
    """

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.5, 2.0),
        generator: torch.Generator | None = None,
        *,
        kinds: Mapping[str, TargetKind],
    ) -> None:
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.generator = generator
        self.kinds = _merge_kinds(kinds)

    def __call__(self, sample: Sample) -> Sample:
        scale = _uniform(*self.scale_range, self.generator)
        if scale == 1.0:
            return sample
        height, width = sample["image"].shape[-2:]
        size = (int(height * scale), int(width * scale))
        out = dict(sample)
        for key, kind in _dense_items(sample, self.kinds):
            value = sample[key]
            if kind == "image":
                out[key] = resize_bilinear(value, size)
            elif kind == "distance":
                resized = resize_nearest(value, size)
                out[key] = torch.where(resized != IGNORE_INDEX, resized / scale, resized)
            else:
                out[key] = resize_nearest(value, size)
        return out


class RandomCrop:
    """Crop a random ``size`` window; a dimension smaller than ``size`` is kept whole (padding comes later).

    With ``cat_max_ratio < 1`` and a ``ratio_key`` target in the sample, the window is re-drawn
    up to ``max_tries`` times until it holds at least two non-ignored classes of that target and
    none of them covers ``cat_max_ratio`` or more of its non-ignored pixels; after the last
    failed try the next draw is used unchecked (ATRC / mmseg behaviour).

    Args:
        size: ``(h, w)`` of the crop.
        cat_max_ratio: largest admissible share of one class.
        max_tries: re-draws allowed.
        ratio_key: the segmentation target the ratio is measured on (None: never re-drawn;
            :func:`crop_balance_key`).
        generator: torch generator of the draws.
        kinds: the kind of every target, by key.
    """

    def __init__(
        self,
        size: tuple[int, int],
        cat_max_ratio: float = 0.75,
        max_tries: int = 10,
        ratio_key: str | None = None,
        generator: torch.Generator | None = None,
        *,
        kinds: Mapping[str, TargetKind],
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.cat_max_ratio = cat_max_ratio
        self.max_tries = max_tries
        self.ratio_key = ratio_key
        self.generator = generator
        self.kinds = _merge_kinds(kinds)

    def _draw(self, height: int, width: int) -> tuple[int, int] | None:
        if (height, width) == self.size:
            return None
        top = _randint(0, max(height - self.size[0], 0), self.generator)
        left = _randint(0, max(width - self.size[1], 0), self.generator)
        return top, left

    def _crop(self, value: torch.Tensor, corner: tuple[int, int] | None) -> torch.Tensor:
        if corner is None:
            return value
        top, left = corner
        return value[..., top : top + self.size[0], left : left + self.size[1]]

    def _acceptable(self, labels: torch.Tensor) -> bool:
        _, counts = torch.unique(labels[labels != IGNORE_INDEX], return_counts=True)
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample["image"].shape[-2:]
        corner = self._draw(height, width)
        if self.cat_max_ratio < 1.0 and self.ratio_key is not None and self.ratio_key in sample:
            for _ in range(self.max_tries):
                if self._acceptable(self._crop(sample[self.ratio_key], corner)):
                    break
                corner = self._draw(height, width)
        out = dict(sample)
        for key, _ in _dense_items(sample, self.kinds):
            out[key] = self._crop(sample[key], corner)
        return out


class RandomHorizontalFlip:
    """Flip the image and every dense target with probability ``p``; negate the x component of normals.

    Ignored normals (255) stay 255.

    Args:
        p: flip probability.
        generator: optional torch generator for reproducible draws.
        kinds: the kind of every target, by key.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None, *, kinds: Mapping[str, TargetKind]) -> None:
        self.p = p
        self.generator = generator
        self.kinds = _merge_kinds(kinds)

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand((), generator=self.generator).item() >= self.p:
            return sample
        out = dict(sample)
        for key, kind in _dense_items(sample, self.kinds):
            value = sample[key].flip(-1)
            if kind == "direction":
                value = value.clone()
                value[0] = torch.where(value[0] != IGNORE_INDEX, -value[0], value[0])
            out[key] = value
        return out


def _convert(x: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """``clip(x * alpha + beta, 0, 255)`` truncated to uint8."""
    return (x.float() * alpha + beta).clamp_(0.0, 255.0).to(torch.uint8)


def rgb_to_hsv8(rgb: torch.Tensor) -> torch.Tensor:
    """8-bit RGB ``(3, H, W)`` uint8 -> HSV uint8 with H in [0, 180) (degrees / 2), S and V in [0, 255]."""
    r, g, b = rgb.double()
    v, _ = rgb.double().max(dim=0)
    diff = v - rgb.double().min(dim=0).values
    safe = torch.where(diff > 0, diff, torch.ones_like(diff))
    hue = torch.where(v == r, 60.0 * (g - b) / safe, torch.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    hue = torch.where(diff > 0, hue, torch.zeros_like(hue))
    hue = torch.where(hue < 0, hue + 360.0, hue)
    sat = torch.where(v > 0, diff / torch.where(v > 0, v, torch.ones_like(v)) * 255.0, torch.zeros_like(v))
    h8 = torch.round(hue / 2.0).remainder(180.0)
    return torch.stack((h8, torch.round(sat), v)).to(torch.uint8)


def hsv8_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv8`: HSV uint8 ``(3, H, W)`` -> RGB uint8."""
    h, s, v = hsv.double()
    h = (h * 2.0).remainder(360.0) / 60.0
    s = s / 255.0
    chroma = v * s
    x = chroma * (1.0 - (h.remainder(2.0) - 1.0).abs())
    zero = torch.zeros_like(v)
    sector = h.floor().long().clamp_(0, 5)
    choices = (
        (chroma, x, zero),
        (x, chroma, zero),
        (zero, chroma, x),
        (zero, x, chroma),
        (x, zero, chroma),
        (chroma, zero, x),
    )
    out = torch.zeros((3, *v.shape), dtype=torch.float64)
    for index, (r, g, b) in enumerate(choices):
        mask = sector == index
        out[0][mask], out[1][mask], out[2][mask] = r[mask], g[mask], b[mask]
    out += (v - chroma)[None]
    return torch.round(out).clamp_(0.0, 255.0).to(torch.uint8)


class PhotometricDistortion:
    """Random brightness, contrast, saturation and hue of an image in [0, 255] (mmseg / ATRC).

    The image is first truncated to uint8. Each step happens with probability 0.5: brightness
    (add U[-delta, delta]), contrast (multiply by U[contrast_range]) either first or last (a coin
    flip), saturation (multiply S by U[saturation_range]) and hue (shift H by an integer in
    ``[-hue_delta, hue_delta)`` in OpenCV's 0-180 units); every step clips and truncates to uint8.
    HSV conversion uses OpenCV's 8-bit formulas in floating point. Targets are untouched.

    Args:
        brightness_delta: largest brightness shift.
        contrast_range: range of the contrast factor.
        saturation_range: range of the saturation factor.
        hue_delta: largest hue shift.
        generator: torch generator of the draws.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
        generator: torch.Generator | None = None,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta
        self.generator = generator

    def _contrast(self, img: torch.Tensor) -> torch.Tensor:
        if _chance(0.5, self.generator):
            return _convert(img, alpha=_uniform(*self.contrast_range, self.generator))
        return img

    def __call__(self, sample: Sample) -> Sample:
        img = sample["image"].to(torch.uint8)
        if _chance(0.5, self.generator):
            img = _convert(img, beta=_uniform(-self.brightness_delta, self.brightness_delta, self.generator))
        contrast_first = _chance(0.5, self.generator)
        if contrast_first:
            img = self._contrast(img)
        if _chance(0.5, self.generator):
            hsv = rgb_to_hsv8(img)
            hsv[1] = _convert(hsv[1], alpha=_uniform(*self.saturation_range, self.generator))
            img = hsv8_to_rgb(hsv)
        if _chance(0.5, self.generator):
            hsv = rgb_to_hsv8(img)
            shift = _randint(-self.hue_delta, self.hue_delta - 1, self.generator)
            hsv[0] = (hsv[0].long() + shift).remainder(180).to(torch.uint8)
            img = hsv8_to_rgb(hsv)
        if not contrast_first:
            img = self._contrast(img)
        return {**sample, "image": img.float()}


class Normalize:
    """Map the image from [0, 255] to ``(x / 255 - mean) / std``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, sample: Sample) -> Sample:
        return {**sample, "image": (sample["image"].float() / 255.0 - self.mean) / self.std}


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Undo :class:`Normalize` (ImageNet mean and std): a ``(3, H, W)`` or ``(B, 3, H, W)`` input as
    float32 in [0, 1] (values outside clipped)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return (image.float() * std + mean).clamp(0.0, 1.0)


class Pad:
    """Centre the sample in a canvas of at least ``size``: image padded with 0, targets with 255.

    A dimension already at least as large as ``size`` is not padded (nor cropped).

    Args:
        size: ``(h, w)`` to pad to.
        kinds: the kind of every target, by key.
    """

    def __init__(self, size: tuple[int, int], *, kinds: Mapping[str, TargetKind]) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.kinds = _merge_kinds(kinds)

    def __call__(self, sample: Sample) -> Sample:
        height, width = sample["image"].shape[-2:]
        dh, dw = max(self.size[0] - height, 0), max(self.size[1] - width, 0)
        if dh == 0 and dw == 0:
            return sample
        pad = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)
        out = dict(sample)
        for key, kind in _dense_items(sample, self.kinds):
            value = sample[key]
            fill = 0.0 if kind == "image" else IGNORE_INDEX
            flat = value.reshape(-1, *value.shape[-2:])
            padded = F.pad(flat, pad, mode="constant", value=fill)
            out[key] = padded.reshape(*value.shape[:-2], *padded.shape[-2:])
        return out


class IgnoreEmptyParts:
    """Mark a part target all-ignore (255) when it holds no part pixel (only background 0 and 255).

    InvPT / ATRC apply this after cropping, so a training crop without any part is ignored too.

    Args:
        keys: the part targets (:func:`empty_ignored_keys`).
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for key in self.keys:
            value = sample.get(key)
            if value is not None and bool(((value == 0) | (value == IGNORE_INDEX)).all()):
                out[key] = torch.full_like(value, IGNORE_INDEX)
        return out


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({[type(t).__name__ for t in self.transforms]})"


def train_transform(
    size: tuple[int, int],
    tasks: Sequence[Task],
    generator: torch.Generator | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
) -> Compose:
    """The ATRC / InvPT training pipeline for an unnormalised sample (image in [0, 255]).

    Args:
        size: ``(h, w)`` train size (crop, then pad).
        tasks: the tasks of the samples: the kinds of their targets, the crop-balancing target
            (:func:`crop_balance_key`) and the part targets (:func:`empty_ignored_keys`).
        generator: torch generator of every random draw.
        scale_range: range of the random scale factor.
        cat_max_ratio: largest share of one class of the crop-balancing target in a crop.
    """
    kinds = transform_kinds(tasks)
    return Compose(
        [
            RandomScale(scale_range, generator, kinds=kinds),
            RandomCrop(size, cat_max_ratio, ratio_key=crop_balance_key(tasks), generator=generator, kinds=kinds),
            RandomHorizontalFlip(0.5, generator, kinds=kinds),
            PhotometricDistortion(generator=generator),
            Normalize(),
            Pad(size, kinds=kinds),
            IgnoreEmptyParts(empty_ignored_keys(tasks)),
        ]
    )


def eval_transform(size: tuple[int, int] | None, tasks: Sequence[Task]) -> Compose:
    """Evaluation pipeline: ImageNet normalisation, then (when ``size`` is given) padding with ignore,
    then part targets without any part made all-ignore.

    No resizing and no test-time augmentation.

    Args:
        size: ``(h, w)`` to pad to, or None.
        tasks: the tasks of the samples (target kinds and part targets).
    """
    steps: list[Callable[[Sample], Sample]] = [Normalize()]
    if size is not None:
        steps.append(Pad(size, kinds=transform_kinds(tasks)))
    steps.append(IgnoreEmptyParts(empty_ignored_keys(tasks)))
    return Compose(steps)


def check_size(size: Sequence[int] | None, name: str) -> tuple[int, int] | None:
    """Validate an ``(h, w)`` option: two positive ints, or None."""
    if size is None:
        return None
    if len(size) != 2 or any(int(s) != s or s <= 0 for s in size):
        raise ValueError(f"{name} must be two positive integers (h, w), got {list(size)}")
    return int(size[0]), int(size[1])
