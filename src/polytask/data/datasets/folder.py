"""The user's own dense multi-task data: ``images/`` plus one folder per task, described by ``polytask.yaml``.

Layout under ``root``::

    polytask.yaml
    images/<id>.jpg | .jpeg | .png
    <task>/<id>.png | .npy            one folder per task, named after the task
    splits/train.txt, splits/val.txt  ids, one per line (splits/test.txt optional)

``polytask.yaml``::

    tasks:
      semseg: {kind: semseg, classes: [background, road, car]}
      depth: {kind: depth, png_scale: 1000}
      normals: {kind: normals}
    loss_weights: {normals: 10.0}          # optional, default 1.0 per task
    splits: {train: splits/train.txt, val: splits/val.txt}   # optional, these are the defaults

Task kinds and target files (255 = ignore everywhere):

* ``semseg``, ``human_parts`` (``classes`` required): single-channel PNG or integer ``.npy``
  ``(H, W)`` of class ids.
* ``sal``, ``edge``: single-channel PNG, ``value > 127`` -> 1 (no ignore); or ``.npy`` ``(H, W)``
  of {0, 1, 255}.
* ``depth``: ``.npy`` ``(H, W)`` in metres, or single-channel (16-bit) PNG divided by
  ``png_scale`` (default 1000, i.e. millimetres); 0 = invalid.
* ``normals``: ``.npy`` ``(H, W, 3)`` unit vectors (x right, y down, z towards the camera; all-zero
  = invalid), or RGB PNG with ``n = 2 * value / 255 - 1`` and black (0, 0, 0) = invalid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

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
    require_file,
)
from polytask.data.transforms import check_size, eval_transform, train_transform
from polytask.tasks import TASK_REGISTRY, Task, build_task

SPEC_FILE = "polytask.yaml"
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
TARGET_SUFFIXES: tuple[str, ...] = (".png", ".npy")
TASK_KINDS: tuple[str, ...] = tuple(
    name for name, kind in TASK_REGISTRY.items() if kind.task_class.dense and name != "binary_seg"
)
"""The kinds ``polytask.yaml`` may name: the registered per-pixel kinds, but for one-vs-rest binary
segmentation (the MTAN datasets derive it from a segmentation; it is not stored as files)."""
SEGMENTATION_KINDS: tuple[str, ...] = tuple(
    name for name in TASK_KINDS if {"num_classes", "class_names"} <= TASK_REGISTRY[name].options()
)
"""The kinds whose tasks are built with ``classes``."""
DEFAULT_SPLITS: dict[str, str] = {"train": "splits/train.txt", "val": "splits/val.txt"}


@dataclass(frozen=True)
class TaskSpec:
    """One task of ``polytask.yaml``: its kind, classes (segmentation) and PNG depth scale."""

    kind: str
    classes: tuple[str, ...] = ()
    png_scale: float = 1000.0


@dataclass(frozen=True)
class FolderSpec:
    """The parsed ``polytask.yaml``: tasks by name, loss weights, split files by split."""

    tasks: dict[str, TaskSpec]
    loss_weights: dict[str, float] = field(default_factory=dict)
    splits: dict[str, Path] = field(default_factory=dict)


def _task_spec(name: str, entry: Any, path: Path) -> TaskSpec:
    if not isinstance(entry, Mapping) or entry.get("kind") not in TASK_KINDS:
        raise DataFileError(path, "format", f"task {name!r}: needs 'kind', one of {list(TASK_KINDS)}")
    unknown = sorted(set(entry) - {"kind", "classes", "png_scale"})
    if unknown:
        raise DataFileError(path, "format", f"task {name!r}: unknown key(s) {unknown}")
    kind = str(entry["kind"])
    classes = entry.get("classes")
    if kind in SEGMENTATION_KINDS and (not isinstance(classes, list) or len(classes) < 2):
        raise DataFileError(path, "format", f"task {name!r} ({kind}): 'classes' must list at least 2 class names")
    names = [str(c) for c in classes or ()]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise DataFileError(path, "format", f"task {name!r} ({kind}): class name(s) {repeated} listed more than once")
    return TaskSpec(kind, tuple(names), float(entry.get("png_scale", 1000.0)))


def read_spec(root: Path) -> FolderSpec:
    """Parse and validate ``root/polytask.yaml``.

    Raises:
        DataFileError: the file is missing or malformed.
    """
    path = require_file(Path(root) / SPEC_FILE)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataFileError(path, "format", f"not valid YAML ({err})") from err
    if not isinstance(data, Mapping) or not isinstance(data.get("tasks"), Mapping) or not data["tasks"]:
        raise DataFileError(path, "format", "needs a 'tasks' mapping of task name -> {kind: ...}")
    unknown = sorted(set(data) - {"tasks", "loss_weights", "splits"})
    if unknown:
        raise DataFileError(path, "format", f"unknown key(s) {unknown}")
    tasks = {str(name): _task_spec(str(name), entry, path) for name, entry in data["tasks"].items()}
    weights = {str(k): float(v) for k, v in (data.get("loss_weights") or {}).items()}
    extra = sorted(set(weights) - set(tasks))
    if extra:
        raise DataFileError(path, "format", f"loss_weights names unknown task(s) {extra}")
    splits = {str(k): str(v) for k, v in (data.get("splits") or DEFAULT_SPLITS).items()}
    if "train" not in splits or "val" not in splits:
        raise DataFileError(path, "format", "splits must name at least 'train' and 'val' files")
    if "splits" not in data and (Path(root) / "splits" / "test.txt").is_file():
        splits["test"] = "splits/test.txt"
    return FolderSpec(tasks, weights, {k: Path(root) / v for k, v in splits.items()})


def _stems(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """Files of ``folder`` with one of ``suffixes`` by stem (the first suffix listed wins)."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    with os.scandir(folder) as entries:
        for entry in entries:
            path = Path(entry.path)
            if path.suffix.lower() in suffixes and entry.is_file():
                best = found.get(path.stem)
                if best is None or suffixes.index(path.suffix.lower()) < suffixes.index(best.suffix.lower()):
                    found[path.stem] = path
    return found


class FolderDataset(FileDataset):
    """One split of a folder dataset (see the module docstring).

    Args:
        root: the dataset directory.
        spec: its parsed ``polytask.yaml``.
        split: a split of ``spec.splits``.
        tasks: tasks to decode (named as in the spec).
        transform: applied to every sample dict.
    """

    def __init__(
        self, root: Path, spec: FolderSpec, split: str, tasks: Sequence[Task], transform: Callable[[dict], dict] | None = None
    ) -> None:
        self.root = Path(root)
        self.spec = spec
        self.found = {"image": _stems(self.root / "images", IMAGE_SUFFIXES)}
        for task in tasks:
            self.found[task.name] = _stems(self.root / task.name, TARGET_SUFFIXES)
        super().__init__(read_lines(spec.splits[split]), tasks, transform)

    def _path(self, role: str, sample: str) -> Path:
        folder = "images" if role == "image" else role
        default = f"{sample}{IMAGE_SUFFIXES[0] if role == 'image' else TARGET_SUFFIXES[0]}"
        return self.found[role].get(sample, self.root / folder / default)

    def files(self, index: int) -> dict[str, DataFile]:
        return {role: DataFile(self._path(role, self.ids[index])) for role in ("image", *self.tasks)}

    def load_image(self, index: int) -> torch.Tensor:
        return image_tensor(read_rgb(self._path("image", self.ids[index])))

    def load_target(self, index: int, task: str) -> torch.Tensor:
        path = self._path(task, self.ids[index])
        spec = self.spec.tasks[task]
        is_png = path.suffix.lower() == ".png"
        if spec.kind == "normals":
            value = self._normals(path, is_png)
        else:
            value = as_2d(read_png(path, 1) if is_png else read_npy(path), path)
        check_same_size(value.shape[-2:] if spec.kind == "normals" else value.shape, self.image_size(index), path)
        if spec.kind in SEGMENTATION_KINDS or spec.kind == "sal":
            if not is_png and value.dtype.kind not in "iub":
                raise DataFileError(path, "format", f"expected integer labels, found {value.dtype}")
            labels = (value > 127).astype(np.int64) if is_png and spec.kind == "sal" else value.astype(np.int64)
            return torch.from_numpy(labels)
        if spec.kind == "edge":
            edge = (value > 127) if is_png else value
            return torch.from_numpy(edge.astype(np.float32)[None])
        if spec.kind == "depth":
            depth = value.astype(np.float32) / np.float32(spec.png_scale) if is_png else value.astype(np.float32)
            return torch.from_numpy(depth[None])
        return torch.from_numpy(value)

    @staticmethod
    def _normals(path: Path, is_png: bool) -> np.ndarray:
        """Normals float32 ``(3, H, W)`` from an RGB PNG or an ``(H, W, 3)`` ``.npy``."""
        if is_png:
            rgb = read_png(path, 3)
            normals = normals_from_rgb(rgb)
            normals[(rgb == 0).all(axis=2)] = 0.0
        else:
            normals = read_npy(path).astype(np.float32)
            if normals.ndim != 3 or normals.shape[2] != 3:
                raise DataFileError(path, "format", f"expected normals of shape (H, W, 3), found {normals.shape}")
        return np.ascontiguousarray(normals.transpose(2, 0, 1))


class FolderDataModule(FileDataModule):
    """The user's own dense multi-task dataset (see the module docstring for the format).

    Args:
        root: the dataset directory (holding ``polytask.yaml``).
        tasks: subset of the tasks of ``polytask.yaml`` (default: all).
        train_size: ``(h, w)`` of training crops (ATRC augmentation) or padding (without it).
        eval_size: ``(h, w)`` evaluation images are padded to (default: ``train_size``).
        augment: train with the ATRC / InvPT augmentation (else normalise and pad only).
        batch_size: images per training batch.
        kwargs: further options of :class:`~polytask.data.file_datamodule.FileDataModule` (``tasks``,
            ``eval_batch_size``, ``num_workers``, ``on_bad_samples``, ``predict_dir``, ``predict_size``).

    Raises:
        DataFileError: ``polytask.yaml`` is missing or malformed.
    """

    name = "folder"

    def __init__(
        self,
        root: str | Path,
        train_size: tuple[int, int] = (512, 512),
        eval_size: tuple[int, int] | None = None,
        augment: bool = True,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        self.spec = read_spec(Path(root).expanduser())
        self.train_size = check_size(train_size, "train_size")
        self.eval_size = check_size(eval_size, "eval_size") or self.train_size
        self.augment = augment
        self.disk_splits = tuple(self.spec.splits)
        fallback = "test" if "test" in self.spec.splits else "val"
        self.stage_splits = {"train": "train", "val": "val", "test": fallback, "predict": fallback}
        super().__init__(root=root, batch_size=batch_size, **kwargs)

    @property
    def spec_path(self) -> Path:
        """The ``polytask.yaml`` the tasks come from."""
        return self.root / SPEC_FILE

    def available_tasks(self) -> list[Task]:
        tasks = []
        for name, spec in self.spec.tasks.items():
            if spec.kind in SEGMENTATION_KINDS:
                tasks.append(build_task(spec.kind, name=name, num_classes=len(spec.classes), class_names=spec.classes))
            else:
                tasks.append(build_task(spec.kind, name=name))
        return tasks

    def default_loss_weights(self) -> Mapping[str, float]:
        return {name: self.spec.loss_weights.get(name, 1.0) for name in self.spec.tasks}

    def build_split(self, split: str, tasks: Sequence[Task]) -> FolderDataset:
        if split not in self.spec.splits:
            raise ValueError(f"folder dataset has splits {list(self.spec.splits)}, not {split!r}")
        return FolderDataset(self.root, self.spec, split, tasks)

    def listing_files(self, split: str) -> list[Path]:
        return [self.root / SPEC_FILE, self.spec.splits[split]]

    def make_transform(self, split: str) -> Callable[[dict], dict]:
        if split == "train" and self.augment:
            return train_transform(self.train_size, self.tasks)
        size = self.train_size if split == "train" else self.eval_size
        return eval_transform(size, self.tasks)
