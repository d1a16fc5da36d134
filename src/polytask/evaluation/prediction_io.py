"""Prediction files in the community formats: writers, readers, and the quantisation they imply.

Layout: ``PRED/<task>/<id>.<suffix>``, one file per task and sample, at the sample's original
resolution. Formats (those the ASTMT / MTI-Net / ATRC / InvPT code saves and SEISM reads):

=======================  ==============================  =========================================
task                     file                            value read back
=======================  ==============================  =========================================
semseg, human_parts      8-bit grey (or palette) PNG     the stored class id
sal                      8-bit grey PNG                  ``v / 255`` (P(salient))
edge                     8-bit grey PNG                  ``v / 255`` (boundary probability)
normals                  8-bit RGB PNG                   ``2 v / 255 - 1`` per channel
depth                    ``.npy`` float32 ``(H, W)``     metres as stored
depth (alternative)      16-bit grey PNG                 ``v / 1000``: millimetres, 0..65.535 m
=======================  ==============================  =========================================

Writing truncates like the reference code's ``astype(np.uint8)``: a probability ``p`` is stored
as ``floor(255 p)`` and a unit normal component ``n`` as ``floor((n + 1) 255 / 2)``. 16-bit
depth rounds to the nearest millimetre. :func:`quantize_prediction` applies exactly that
round trip in memory, so in-memory scores can be compared with scores of saved files. The
readers of probability maps accept 16-bit PNGs too (``v / 65535``), as SEISM's
``read_one_cont_png`` does.

Each task states the kind of file it is saved as (:attr:`polytask.tasks.Task.prediction_format`)
and converts its predictions to and from the stored arrays
(:meth:`~polytask.tasks.Task.encode_prediction`, :meth:`~polytask.tasks.Task.decode_prediction`,
:meth:`~polytask.tasks.Task.quantize_prediction`); this module reads and writes the files.

Readers validate the file against the ground truth's ``(H, W)`` and raise
:class:`PredictionFileError` naming the file, the task and what was expected.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from polytask.evaluation.boundary import read_prediction_png
from polytask.tasks import DepthFormat, PredictionFormat, Task
from polytask.tasks.codes import DEPTH_PNG_SCALE

__all__ = [
    "DEPTH_PNG_SCALE",
    "DepthFormat",
    "PredictionFileError",
    "encode_prediction",
    "find_prediction",
    "has_file_format",
    "prediction_path",
    "probe_prediction",
    "quantize_prediction",
    "read_prediction",
    "sample_path",
    "write_prediction",
]

ProblemKind = Literal["missing", "ambiguous", "unreadable", "mode", "shape", "values"]


class PredictionFileError(Exception):
    """A prediction file that is missing or does not hold a valid prediction.

    Attributes:
        path: the offending file (the expected path when it is missing).
        task: the task name.
        kind: what is wrong.
        detail: a sentence for the user, saying what was expected.
    """

    def __init__(self, path: str | Path, task: str, kind: ProblemKind, detail: str) -> None:
        self.path = Path(path)
        self.task = task
        self.kind: ProblemKind = kind
        self.detail = detail
        super().__init__(f"{self.path}: task {task!r}: {detail}")


def has_file_format(task: Task) -> bool:
    """Whether predictions of ``task`` can be saved as files (the dense tasks)."""
    return task.prediction_format is not None


def sample_path(sample_id: str) -> PurePosixPath:
    """``sample_id`` as a relative path (ids may hold ``/``), refusing absolute paths and ``..``.

    Raises:
        ValueError: the id is empty, absolute, or has an empty, ``.`` or ``..`` component.
    """
    path = PurePosixPath(sample_id)
    if not sample_id or path.is_absolute() or any(part in ("", ".", "..") for part in sample_id.split("/")):
        raise ValueError(f"sample id {sample_id!r} cannot name a prediction file (empty, absolute, or with '.'/'..' parts)")
    return path


def prediction_path(pred_dir: str | Path, task: str, sample_id: str, suffix: str) -> Path:
    """``pred_dir / task / (sample_id + suffix)``."""
    return Path(pred_dir) / task / f"{sample_path(sample_id)}{suffix}"


# ------------------------------------------------------------------ encoding


def encode_prediction(task: Task, value: torch.Tensor, depth_format: DepthFormat = "npy") -> tuple[np.ndarray, str]:
    """The array stored for one prediction, and the file suffix (:meth:`Task.encode_prediction`).

    Args:
        task: the task (it decides the format).
        value: one prediction without batch axis: ``(H, W)`` labels or saliency, ``(1, H, W)``
            boundary probability or depth, ``(3, H, W)`` unit normals.
        depth_format: ``npy`` (float32 metres) or ``png16`` (millimetres).

    Returns:
        ``(array, suffix)``: uint8 ``(H, W)`` / ``(H, W, 3)``, uint16 ``(H, W)`` or float32 ``(H, W)``.

    Raises:
        ValueError: wrong shape, non-finite values, labels outside the class range, negative
            depth, or depth too large for ``png16``.
    """
    return task.encode_prediction(value, depth_format)


def write_prediction(
    pred_dir: str | Path, task: Task, sample_id: str, value: torch.Tensor, depth_format: DepthFormat = "npy"
) -> Path:
    """Save one prediction as ``pred_dir/<task>/<id>.<suffix>`` (see :func:`encode_prediction`).

    The file is written under a temporary name and renamed, so concurrent writers of the same
    sample (distributed padding) never leave a partial file.

    Returns:
        The path written.
    """
    array, suffix = encode_prediction(task, value, depth_format)
    path = prediction_path(pred_dir, task.name, sample_id, suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if suffix == ".npy":
                np.save(f, array)
            else:
                Image.fromarray(array).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def quantize_prediction(task: Task, value: torch.Tensor, depth_format: DepthFormat = "npy") -> torch.Tensor:
    """What reading back a saved prediction gives, computed in memory (:meth:`Task.quantize_prediction`).

    Args:
        task: the task.
        value: predictions in the contract layout, with or without batch axis (normals: channels
            at dim -3).
        depth_format: the depth file format.

    Returns:
        A tensor of ``value``'s shape: labels unchanged, probabilities ``floor(255 p) / 255``,
        normals ``2 floor((n + 1) 255 / 2) / 255 - 1``, depth as float32 (``npy``) or rounded
        to millimetres (``png16``).
    """
    return task.quantize_prediction(value, depth_format)


# ------------------------------------------------------------------ reading


_SUFFIXES: dict[PredictionFormat, tuple[str, ...]] = {
    "labels": (".png",),
    "probability": (".png",),
    "direction": (".png",),
    "distance": (".npy", ".png"),
}


def find_prediction(pred_dir: str | Path, task: Task, sample_id: str) -> Path:
    """The file of ``sample_id``'s prediction of ``task``.

    Raises:
        PredictionFileError: ``missing`` (no file), or ``ambiguous`` (depth as both .npy and .png).
    """
    suffixes = _SUFFIXES[task.file_format()]
    found = [p for p in (prediction_path(pred_dir, task.name, sample_id, s) for s in suffixes) if p.is_file()]
    if not found:
        expected = prediction_path(pred_dir, task.name, sample_id, suffixes[0])
        raise PredictionFileError(expected, task.name, "missing", f"file not found (expected {' or '.join(suffixes)})")
    if len(found) > 1:
        raise PredictionFileError(found[0], task.name, "ambiguous", f"both {found[0].name} and {found[1].name} exist; keep one")
    return found[0]


_PNG_MODES: dict[PredictionFormat, tuple[str, ...]] = {
    "labels": ("L", "P"),
    "probability": ("L", "I;16"),
    "direction": ("RGB",),
    "distance": ("I;16",),
}


_MODE_WORDS: dict[PredictionFormat, str] = {
    "labels": "an 8-bit single-channel (L or P) PNG of class ids",
    "probability": "a single-channel 8-bit (L) or 16-bit (I;16) PNG of probabilities",
    "direction": "an 8-bit RGB PNG",
    "distance": "a 16-bit (I;16) PNG of millimetres",
}


def _header(path: Path, task: Task, kind: PredictionFormat) -> tuple[tuple[int, int], str]:
    """``((H, W), mode)`` of an image file from its header; ``mode`` is ``npy`` for arrays."""
    if path.suffix == ".npy":
        try:
            with path.open("rb") as f:
                version = np.lib.format.read_magic(f)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = reader(f)
        except (ValueError, OSError, EOFError) as err:
            raise PredictionFileError(path, task.name, "unreadable", f"not a .npy file ({err})") from err
        if dtype.kind != "f":
            raise PredictionFileError(path, task.name, "mode", f"expected float depths in metres, found dtype {dtype}")
        return _depth_shape(tuple(int(s) for s in shape), path, task), "npy"
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
            image_format = img.format
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PredictionFileError(path, task.name, "unreadable", f"not a readable image ({err})") from err
    if image_format != "PNG" or mode not in _PNG_MODES[kind]:
        raise PredictionFileError(
            path, task.name, "mode", f"expected {_MODE_WORDS[kind]}, found a {image_format} image of mode {mode}"
        )
    return (height, width), mode


def _depth_shape(shape: tuple[int, ...], path: Path, task: Task) -> tuple[int, int]:
    """``(H, W)`` of a depth array stored as ``(H, W)``, ``(1, H, W)`` or ``(H, W, 1)``."""
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] == 1:
        return shape[1], shape[2]
    if len(shape) == 3 and shape[2] == 1:
        return shape[0], shape[1]
    raise PredictionFileError(path, task.name, "shape", f"expected a depth map (H, W), found an array of shape {shape}")


def probe_prediction(pred_dir: str | Path, task: Task, sample_id: str, shape: tuple[int, int]) -> Path:
    """Header-level check of one prediction file: present, right format, ``(H, W) == shape``.

    Returns:
        The file's path.

    Raises:
        PredictionFileError: missing, ambiguous, unreadable header, wrong mode/dtype, wrong size.
    """
    kind = task.file_format()
    path = find_prediction(pred_dir, task, sample_id)
    size, _ = _header(path, task, kind)
    if size != tuple(shape):
        raise PredictionFileError(
            path, task.name, "shape", f"size {size[0]}x{size[1]} differs from the ground truth's {shape[0]}x{shape[1]} (H x W)"
        )
    return path


def _decode_image(path: Path, task: Task) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise PredictionFileError(path, task.name, "unreadable", f"cannot decode ({err})") from err


def read_prediction(pred_dir: str | Path, task: Task, sample_id: str, shape: tuple[int, int]) -> torch.Tensor:
    """Read and validate one prediction file.

    Args:
        pred_dir: the prediction folder (``PRED``).
        task: the task.
        sample_id: the sample id.
        shape: ``(H, W)`` of the ground truth.

    Returns:
        The prediction in the contract layout without batch axis: int64 ``(H, W)`` labels,
        float32 ``(H, W)`` saliency, float32 ``(1, H, W)`` boundary probability or depth,
        float32 ``(3, H, W)`` normals.

    Raises:
        PredictionFileError: see :func:`probe_prediction`; also undecodable data, class ids
            outside the task's classes, non-finite or negative depth.
    """
    kind = task.file_format()
    path = probe_prediction(pred_dir, task, sample_id, shape)
    stored = _read_stored(path, task, kind, shape)
    try:
        return task.decode_prediction(stored)
    except ValueError as err:
        raise PredictionFileError(path, task.name, "values", str(err)) from err


def _read_stored(path: Path, task: Task, kind: PredictionFormat, shape: tuple[int, int]) -> np.ndarray:
    """The array of a prediction file: a ``.npy`` as float32 ``shape``; a probability PNG as SEISM
    reads it (``v / 255``, ``v / 65535``); any other PNG's pixels."""
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False).astype(np.float32).reshape(shape)
        except (ValueError, OSError, EOFError) as err:
            raise PredictionFileError(path, task.name, "unreadable", f"cannot read the array ({err})") from err
    if kind == "probability":
        try:
            return read_prediction_png(path)
        except (OSError, ValueError, SyntaxError) as err:
            raise PredictionFileError(path, task.name, "unreadable", f"cannot decode ({err})") from err
    return _decode_image(path, task)
