"""Prediction inputs from a folder of images, with every bad file converted or refused by name.

:class:`ImageFolder` lists a folder (not its subfolders; hidden files are ignored) and decodes
every file once before any prediction runs:

* converted (and noted): grey-scale, palette, CMYK and other colour modes to RGB; an alpha
  channel is dropped; 16-bit images keep their 8 most significant bits; EXIF orientation is
  applied; of a multi-frame file the first frame is used; an image larger than ``max_side``
  (longer side) is downscaled, keeping its aspect ratio;
* refused (with the reason): empty files, files that are not images or are truncated or
  corrupt, floating-point images, images with a zero side or more than ``max_pixels`` pixels
  (decompression bombs).

Images are then normalised like the training images (ImageNet mean and std, ``(3, H, W)``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from polytask.constants import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_MAX_SIDE = 2048
DEFAULT_MAX_PIXELS = 100_000_000
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_GREY_MODES = ("L", "1")


class BadImageError(ValueError):
    """An input image that cannot be used; the message names the file and the reason."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class FileNote:
    """A remark about one input file: why it was refused, or how it was converted."""

    path: Path
    message: str


def _to_rgb(image: Image.Image, path: Path) -> tuple[Image.Image, list[str]]:
    """An 8-bit RGB version of a decoded ``image`` and notes on what was converted."""
    mode = image.mode
    if mode == "RGB":
        return image, []
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB"), [f"16-bit grey-scale ({mode}) reduced to 8 bits and converted to RGB"]
    if mode == "F":
        raise BadImageError(path, "floating-point image (mode F) is not supported; save it as an 8- or 16-bit image")
    notes = []
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        notes.append(f"alpha channel of {mode} image dropped")
    elif mode in _GREY_MODES:
        notes.append("grey-scale image converted to RGB")
    else:
        notes.append(f"{mode} image converted to RGB")
    try:
        return image.convert("RGB"), notes
    except ValueError as err:
        raise BadImageError(path, f"pixel mode {mode} cannot be converted to RGB ({err})") from err


def load_image(
    path: Path, max_side: int = DEFAULT_MAX_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, list[str]]:
    """Decode ``path`` to an 8-bit RGB image no larger than ``max_side``.

    Returns:
        The RGB image and notes on the conversions made (empty for a plain RGB image).

    Raises:
        BadImageError: the file is refused (see the module notes).
    """
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError as err:
        raise BadImageError(path, "not an image PIL can read (unknown format or corrupt header)") from err
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"too many pixels (decompression bomb check): {err}") from err
    except OSError as err:
        raise BadImageError(path, f"corrupt or truncated image: {err}") from err
    with image:
        width, height = image.size
        if width == 0 or height == 0:
            raise BadImageError(path, f"image has no pixels ({width} x {height})")
        if width * height > max_pixels:
            raise BadImageError(path, f"{width} x {height} = {width * height} pixels exceeds max_pixels={max_pixels}")
        notes = [f"first of {image.n_frames} frames used"] if getattr(image, "n_frames", 1) > 1 else []
        try:
            image.load()
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImageError(path, f"corrupt or truncated image data: {err}") from err
        if orientation != 1:
            notes.append(f"rotated according to its EXIF orientation ({orientation})")
        rgb, mode_notes = _to_rgb(ImageOps.exif_transpose(image), path)
    notes += mode_notes
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        new_size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        notes.append(f"downscaled from {rgb.width} x {rgb.height} to {new_size[0]} x {new_size[1]} (max_side={max_side})")
        rgb = rgb.resize(new_size, Image.BILINEAR)
    return rgb, notes


def normalise(rgb: Image.Image) -> torch.Tensor:
    """RGB image -> float32 ``(3, H, W)`` normalised with the ImageNet mean and std (as in training)."""
    image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


class ImageFolder(Dataset):
    """Every usable image of a folder, as prediction samples.

    Args:
        root: the folder.
        size: ``(H, W)`` every image is resized to (so they batch); ``None`` keeps each image's size.
        max_side: longer side above which an image is downscaled.
        max_pixels: pixel count above which a file is refused without decoding it.

    A sample is ``{"image": float32 (3, H, W), "meta": {"id": file name, "path": str, "size": (H, W)}}``
    where ``size`` is the image's size before resizing to ``size``.

    Attributes:
        files: the usable images, sorted by name.
        refused: the refused files with their reason.
        converted: notes on the converted files.

    Raises:
        ValueError: ``root`` is not a folder, or none of its files is usable (the reasons are listed).
    """

    def __init__(
        self,
        root: str | Path,
        size: tuple[int, int] | None = None,
        max_side: int = DEFAULT_MAX_SIDE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"predict folder {self.root} does not exist or is not a folder")
        self.size = size
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.files: list[Path] = []
        self.refused: list[FileNote] = []
        self.converted: list[FileNote] = []
        for path in sorted(p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")):
            try:
                _, notes = load_image(path, max_side, max_pixels)
            except BadImageError as err:
                self.refused.append(FileNote(path, err.reason))
                continue
            self.files.append(path)
            self.converted.extend(FileNote(path, note) for note in notes)
        if not self.files:
            listing = "".join(f"\n  {n.path.name}: {n.message}" for n in self.refused)
            raise ValueError(f"no usable image in {self.root} ({len(self.refused)} file(s) refused){listing}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        rgb, _ = load_image(path, self.max_side, self.max_pixels)
        original = (rgb.height, rgb.width)
        if self.size is not None and original != tuple(self.size):
            rgb = rgb.resize((self.size[1], self.size[0]), Image.BILINEAR)
        return {"image": normalise(rgb), "meta": {"id": path.name, "path": str(path), "size": original}}

    def report_refused(self) -> None:
        """Warn once, listing every refused file with its reason."""
        if self.refused:
            listing = "".join(f"\n  {n.path}: {n.message}" for n in self.refused)
            rank_zero_warn(
                f"{len(self.refused)} file(s) of {self.root} refused, predicting the other {len(self.files)}:{listing}"
            )

    def summary(self) -> str:
        """Processed, converted and refused files, for the end of a prediction run."""
        lines = [f"predicted {len(self.files)} image(s) of {self.root}; {len(self.refused)} refused"]
        lines += [f"  refused {n.path.name}: {n.message}" for n in self.refused]
        lines += [f"  converted {n.path.name}: {n.message}" for n in self.converted]
        return "\n".join(lines)
