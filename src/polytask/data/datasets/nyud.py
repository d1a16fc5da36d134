"""NYUD-v2, multi-task version (NYUD_MT), in both circulating versions.

Layout under ``root``::

    gt_sets/{train,val}.txt     ids (795 / 654)
    images/<id>.png | .jpg
    segmentation/<id>.png       40 classes stored 1..40, 0 = unlabelled
    depth/<id>.npy              metres, 0 = invalid
    normals/<id>.png | .npy
    edge/<id>.png | .npy

* ``atrc`` (ATRC / InvPT release): PNG images of about 425x560, normals as RGB PNG
  (``2 * value / 255 - 1``), edges as PNG (``value / 255``). Train / eval size 448x576.
* ``mti-net`` (MTI-Net release): JPG images of 480x640, normals as float ``.npy`` ``(H, W, 3)``
  and edges as float ``.npy`` ``(H, W)``, both taken as stored. Train / eval size 480x640.

Common decodings: ``semseg = value - 1`` with 0 -> 255 (ignore); depth as stored (0 invalid).
The version is detected from the files under ``images/``, ``normals/`` and ``edge/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from polytask.constants import IGNORE_INDEX
from polytask.data.file_datamodule import FileDataModule
from polytask.data.io import (
    DataFile,
    DataFileError,
    FileDataset,
    as_2d,
    check_same_size,
    image_tensor,
    normals_from_rgb,
    read_lines,
    read_npy,
    read_png,
    read_rgb,
)
from polytask.data.protocols import BoundaryProtocol
from polytask.data.transforms import check_size, eval_transform, train_transform
from polytask.tasks import Task, build_task

log = logging.getLogger(__name__)

NYUDVersion = Literal["atrc", "mti-net"]

CLASS_NAMES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
    "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard",
    "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)
TASKS: tuple[str, ...] = ("semseg", "depth", "normals", "edge")
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}
SPLITS: tuple[str, ...] = ("train", "val")
BOUNDARY_PROTOCOL = BoundaryProtocol(max_dist=0.011, ground_truth="seg2bmap(edge map)")
"""The InvPT authors' SEISM set-up for NYUD-v2: tolerance 0.011 of the diagonal, ground truth the
segment boundaries of ``edge/<id>.png`` read as a label map; SEISM's NYUD ``test_new`` holds every
val image."""
VERSION_SIZES: dict[str, tuple[int, int]] = {"atrc": (448, 576), "mti-net": (480, 640)}
VERSION_DESCRIPTIONS: dict[str, str] = {
    "atrc": "the ATRC/InvPT version (PNG images, normals and edges as PNG)",
    "mti-net": "the MTI-Net version (JPG images, normals and edges as .npy)",
}
# Suffixes of images, normals and edges in each version.
_SUFFIXES: dict[str, dict[str, str]] = {
    "atrc": {"images": ".png", "normals": ".png", "edge": ".png"},
    "mti-net": {"images": ".jpg", "normals": ".npy", "edge": ".npy"},
}


def _suffixes(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {entry.suffix.lower() for entry in folder.iterdir() if entry.is_file()}


def detect_version(root: Path) -> NYUDVersion:
    """Which NYUD version ``root`` holds, from the suffixes of its images, normals and edges.

    Raises:
        DataFileError: (``layout``) the root holds neither version, or a mix of both.
    """
    root = Path(root)
    found = {folder: _suffixes(root / folder) for folder in ("images", "normals", "edge")}
    matching = [
        version
        for version, suffixes in _SUFFIXES.items()
        if suffixes["images"] in found["images"]
        and all(not found[f] or suffixes[f] in found[f] for f in ("normals", "edge"))
    ]
    if len(matching) == 1:
        return matching[0]  # type: ignore[return-value]
    seen = ", ".join(f"{folder}/: {sorted(s) or 'nothing'}" for folder, s in found.items())
    expected = "; ".join(
        f"{version}: images/*{s['images']}, normals/*{s['normals']}, edge/*{s['edge']}" for version, s in _SUFFIXES.items()
    )
    raise DataFileError(root, "layout", f"not an NYUD multi-task root of a known version (found {seen}; expected {expected})")


class NYUD(FileDataset):
    """One split of NYUD_MT in either version (see the module docstring).

    Args:
        root: the NYUD_MT directory.
        split: ``train`` or ``val``.
        version: ``atrc`` or ``mti-net`` (see :func:`detect_version`).
        tasks: tasks to decode (from :data:`TASKS`).
        transform: applied to every sample dict.
    """

    def __init__(
        self, root: Path, split: str, version: NYUDVersion, tasks: Sequence[Task], transform: Callable[[dict], dict] | None = None
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"NYUD split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        self.version = version
        self.suffixes = _SUFFIXES[version]
        super().__init__(read_lines(split_file(self.root, split)), tasks, transform)

    def _path(self, task: str, sample: str) -> Path:
        folder, suffix = {
            "image": ("images", self.suffixes["images"]),
            "semseg": ("segmentation", ".png"),
            "depth": ("depth", ".npy"),
            "normals": ("normals", self.suffixes["normals"]),
            "edge": ("edge", self.suffixes["edge"]),
        }[task]
        return self.root / folder / f"{sample}{suffix}"

    def files(self, index: int) -> dict[str, DataFile]:
        sample = self.ids[index]
        return {role: DataFile(self._path(role, sample)) for role in ("image", *self.tasks)}

    def load_image(self, index: int) -> torch.Tensor:
        return image_tensor(read_rgb(self._path("image", self.ids[index])))

    def load_target(self, index: int, task: str) -> torch.Tensor:
        path = self._path(task, self.ids[index])
        shape = self.image_size(index)
        if task == "semseg":
            raw = read_png(path, 1).astype(np.int64)
            check_same_size(raw.shape, shape, path)
            return torch.from_numpy(np.where(raw == 0, IGNORE_INDEX, raw - 1))
        if task == "depth":
            depth = as_2d(read_npy(path), path)
            check_same_size(depth.shape, shape, path)
            return torch.from_numpy(depth.astype(np.float32)[None])
        if task == "normals":
            normals = read_png(path, 3) if path.suffix == ".png" else read_npy(path)
            if normals.ndim != 3 or normals.shape[2] != 3:
                raise DataFileError(path, "format", f"expected normals of shape (H, W, 3), found {normals.shape}")
            check_same_size(normals.shape, shape, path)
            if path.suffix == ".png":
                normals = normals_from_rgb(normals)
            return torch.from_numpy(np.ascontiguousarray(normals.astype(np.float32).transpose(2, 0, 1)))
        if task == "edge":
            edge = read_png(path, 1).astype(np.float32) / 255.0 if path.suffix == ".png" else as_2d(read_npy(path), path)
            check_same_size(edge.shape, shape, path)
            return torch.from_numpy(edge.astype(np.float32)[None])
        raise KeyError(f"NYUD has no task {task!r}")


def split_file(root: Path, split: str) -> Path:
    """The id list of ``split``: ``gt_sets/<split>.txt``."""
    return Path(root) / "gt_sets" / f"{split}.txt"


class NYUDDataModule(FileDataModule):
    """NYUD-v2 multi-task (either version): semseg (40 classes), depth, normals, edge.

    The version found under ``root`` is logged and kept in :attr:`version`. Training uses the
    ATRC / InvPT augmentation; ``test`` and ``predict`` read the ``val`` split.

    Args:
        root: the NYUD_MT directory.
        tasks: subset of :data:`TASKS` (default: all).
        train_size: ``(h, w)`` of training crops (default: 448x576 for ``atrc``, 480x640 for ``mti-net``).
        eval_size: ``(h, w)`` evaluation images are padded to (default: as ``train_size``).
        batch_size: images per training batch.
        kwargs: further options of :class:`~polytask.data.file_datamodule.FileDataModule` (``tasks``,
            ``eval_batch_size``, ``num_workers``, ``on_bad_samples``, ``predict_dir``, ``predict_size``).

    Raises:
        DataFileError: ``root`` holds neither version.
    """

    name = "nyud"
    boundary_protocol = BOUNDARY_PROTOCOL

    def __init__(
        self,
        root: str | Path,
        train_size: tuple[int, int] | None = None,
        eval_size: tuple[int, int] | None = None,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        self.version: NYUDVersion = detect_version(Path(root).expanduser())
        log.info("NYUD root %s holds %s", root, VERSION_DESCRIPTIONS[self.version])
        self.train_size = check_size(train_size, "train_size") or VERSION_SIZES[self.version]
        self.eval_size = check_size(eval_size, "eval_size") or self.train_size
        super().__init__(root=root, batch_size=batch_size, **kwargs)

    def available_tasks(self) -> list[Task]:
        return [
            build_task("semseg", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES),
            build_task("depth"),
            build_task("normals"),
            build_task("edge"),
        ]

    def default_loss_weights(self) -> Mapping[str, float]:
        return DEFAULT_LOSS_WEIGHTS

    def layout_notes(self) -> list[str]:
        return [f"NYUD root holds {VERSION_DESCRIPTIONS[self.version]}"]

    def build_split(self, split: str, tasks: Sequence[Task]) -> NYUD:
        return NYUD(self.root, split, self.version, tasks)

    def listing_files(self, split: str) -> list[Path]:
        return [split_file(self.root, split)]

    def make_transform(self, split: str) -> Callable[[dict], dict]:
        if split == "train":
            return train_transform(self.train_size, self.tasks)
        return eval_transform(self.eval_size, self.tasks)
