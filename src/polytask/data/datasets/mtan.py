"""NYUv2 and Cityscapes as pre-processed by MTAN (``.npy`` per sample), in two task splits.

Layout under ``root`` (``<i>`` = 0, 1, ...)::

    {train,val}/image/<i>.npy    float (H, W, 3) in [0, 1]
    {train,val}/label/<i>.npy    NYUv2: 13 classes, -1 = ignore
    {train,val}/depth/<i>.npy    (H, W, 1); 0 = invalid
    {train,val}/normal/<i>.npy   NYUv2 only: (H, W, 3); all-zero = invalid

Cityscapes keeps its labels in ``label_7/`` or ``label_19/`` (MTAN's release; LibMTL's repack
has the 7-class labels in ``label/``) and its depth is inverse depth (disparity), as released.

Decodings: image scaled to [0, 255] (then ImageNet-normalised by the transform); labels with -1
-> 255; depth as stored (0 invalid, as MTAN's ``depth != 0`` mask); normals as stored, with the
pixels MTAN masks out (components summing to 0) set to 0.

Task splits: ``multiclass`` (``semseg`` + depth [+ normals]) or ``binary`` (Maximum Roaming):
one binary segmentation task ``seg_<class>`` per class (target 1 on that class, 0 on the other
classes, 255 where the multi-class label is ignored), plus depth [+ normals]. The binary tasks
are :class:`~polytask.tasks.BinarySegmentationTask` (one sigmoid logit, BCE), trained as Maximum
Roaming trains them: its one-hot labels make unlabelled pixels negatives of every class in the
loss (the task's ``unlabelled`` option); how they are scored is up to the metric protocol.
No augmentation (as in MTAN and Maximum Roaming).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from polytask.constants import IGNORE_INDEX
from polytask.data.file_datamodule import FileDataModule
from polytask.data.io import DataFile, DataFileError, FileDataset, as_2d, check_same_size, image_tensor, read_npy
from polytask.data.transforms import eval_transform
from polytask.tasks import Task, build_task

TaskSplit = Literal["multiclass", "binary"]

NYUV2_CLASSES: tuple[str, ...] = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv", "wall", "window",
)
CITYSCAPES_7_CLASSES: tuple[str, ...] = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
CITYSCAPES_19_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
SPLITS: tuple[str, ...] = ("train", "val")
_MTAN_IGNORE = -1


def binary_task_name(class_name: str) -> str:
    """``seg_<class>`` with the class name lower-cased and non-alphanumerics as ``_``."""
    return "seg_" + re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


def segmentation_tasks(class_names: Sequence[str], task_split: TaskSplit) -> list[Task]:
    """``semseg`` over ``class_names``, or one binary ``seg_<class>`` task per class."""
    if task_split == "multiclass":
        return [build_task("semseg", num_classes=len(class_names), class_names=class_names)]
    if task_split == "binary":
        return [
            build_task("binary_seg", name=binary_task_name(c), class_names=[f"not {c}", c]) for c in class_names
        ]
    raise ValueError(f"task_split must be 'multiclass' or 'binary', got {task_split!r}")


def decode_labels(raw: np.ndarray, path: Path) -> np.ndarray:
    """MTAN labels (float or int, -1 = ignore) -> int64 ``(H, W)`` with 255 = ignore."""
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
        raise DataFileError(path, "format", "label values are not integers")
    labels = raw.astype(np.int64)
    return np.where(labels == _MTAN_IGNORE, IGNORE_INDEX, labels)


def binary_labels(labels: np.ndarray, class_index: int) -> np.ndarray:
    """1 where ``labels == class_index``, 0 on other valid pixels, 255 where ignored: int64 ``(H, W)``."""
    return np.where(labels == IGNORE_INDEX, IGNORE_INDEX, (labels == class_index).astype(np.int64))


class MTANDataset(FileDataset):
    """One split of an MTAN ``.npy`` dataset.

    Args:
        split_dir: ``root/<split>``.
        label_dir: name of the label folder (``label``, ``label_7``, ``label_19``).
        class_names: the classes of the multi-class labels.
        tasks: tasks to decode: ``semseg`` or ``seg_<class>`` tasks, ``depth``, ``normals``.
        transform: applied to every sample dict.

    Raises:
        DataFileError: ``split_dir/image`` does not exist.
    """

    def __init__(
        self,
        split_dir: Path,
        label_dir: str,
        class_names: Sequence[str],
        tasks: Sequence[Task],
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        self.split_dir = Path(split_dir)
        self.label_dir = label_dir
        self.binary_class = {binary_task_name(c): i for i, c in enumerate(class_names)}
        image_dir = self.split_dir / "image"
        if not image_dir.is_dir():
            raise DataFileError(image_dir, "layout", "folder not found (expected <root>/<split>/image/<i>.npy)")
        indices = sorted(int(p.stem) for p in image_dir.glob("*.npy") if p.stem.isdigit())
        super().__init__([str(i) for i in indices], tasks, transform)

    def _role(self, task: str) -> str:
        return {"depth": "depth", "normals": "normals"}.get(task, "label")

    def _path(self, role: str, sample: str) -> Path:
        folder = {"image": "image", "label": self.label_dir, "depth": "depth", "normals": "normal"}[role]
        return self.split_dir / folder / f"{sample}.npy"

    def files(self, index: int) -> dict[str, DataFile]:
        roles = ["image", *dict.fromkeys(self._role(t) for t in self.tasks)]
        return {role: DataFile(self._path(role, self.ids[index])) for role in roles}

    def target_file(self, index: int, task: str) -> Path:
        return self._path(self._role(task), self.ids[index])

    def load_image(self, index: int) -> torch.Tensor:
        path = self._path("image", self.ids[index])
        image = read_npy(path)
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataFileError(path, "format", f"expected an image of shape (H, W, 3), found {image.shape}")
        scaled = image.astype(np.float32) * 255.0 if image.dtype.kind == "f" else image
        return image_tensor(scaled)

    def load_target(self, index: int, task: str) -> torch.Tensor:
        path = self.target_file(index, task)
        image_shape = self.image_size(index)
        if task == "depth":
            depth = as_2d(read_npy(path), path)
            check_same_size(depth.shape, image_shape, path)
            return torch.from_numpy(depth.astype(np.float32)[None])
        if task == "normals":
            normals = read_npy(path).astype(np.float32)
            if normals.ndim != 3 or normals.shape[2] != 3:
                raise DataFileError(path, "format", f"expected normals of shape (H, W, 3), found {normals.shape}")
            check_same_size(normals.shape, image_shape, path)
            normals[normals.sum(axis=2) == 0] = 0.0
            return torch.from_numpy(np.ascontiguousarray(normals.transpose(2, 0, 1)))
        labels = decode_labels(as_2d(read_npy(path), path), path)
        check_same_size(labels.shape, image_shape, path)
        if task == "semseg":
            return torch.from_numpy(labels)
        if task in self.binary_class:
            return torch.from_numpy(binary_labels(labels, self.binary_class[task]))
        raise KeyError(f"MTAN dataset has no task {task!r}")


class _MTANDataModule(FileDataModule):
    """Shared part of the MTAN datamodules: splits, listing, transform."""

    label_candidates: tuple[str, ...] = ("label",)
    class_names: tuple[str, ...] = ()

    def default_loss_weights(self) -> Mapping[str, float]:
        return {t.name: 1.0 for t in self.available_tasks()}

    def label_dir(self, split: str) -> str:
        """The first label folder of ``label_candidates`` present in ``split``."""
        for name in self.label_candidates:
            if (self.root / split / name).is_dir():
                return name
        expected = " or ".join(f"{split}/{name}/" for name in self.label_candidates)
        raise DataFileError(self.root / split, "layout", f"no label folder ({expected})")

    def build_split(self, split: str, tasks: Sequence[Task]) -> MTANDataset:
        if split not in SPLITS:
            raise ValueError(f"MTAN split must be one of {SPLITS}, got {split!r}")
        needs_labels = any(t.name not in ("depth", "normals") for t in tasks)
        label_dir = self.label_dir(split) if needs_labels else self.label_candidates[0]
        return MTANDataset(self.root / split, label_dir, self.class_names, tasks)

    def make_transform(self, split: str) -> Callable[[dict], dict]:
        return eval_transform(None, self.tasks)


class NYUv2MTANDataModule(_MTANDataModule):
    """NYUv2 pre-processed by MTAN (288x384): 13-class segmentation (or 13 binary tasks), depth, normals.

    ``test`` and ``predict`` read ``val`` (the 654 test images).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        task_split: ``multiclass`` (``semseg``) or ``binary`` (``seg_<class>`` per class).
        tasks: subset of the tasks of the split (default: all).
        batch_size: images per training batch.
        kwargs: further options of :class:`~polytask.data.file_datamodule.FileDataModule` (``tasks``,
            ``eval_batch_size``, ``num_workers``, ``on_bad_samples``, ``predict_dir``, ``predict_size``).
    """

    name = "nyuv2_mtan"
    class_names = NYUV2_CLASSES
    maximum_roaming_batch_size = 2  # nyuv2/train_*.py

    def __init__(
        self,
        root: str | Path,
        task_split: TaskSplit = "multiclass",
        batch_size: int = 2,
        **kwargs: Any,
    ) -> None:
        self.task_split = task_split
        super().__init__(root=root, batch_size=batch_size, **kwargs)

    def available_tasks(self) -> list[Task]:
        return [*segmentation_tasks(self.class_names, self.task_split), build_task("depth"), build_task("normals")]


class CityscapesMTANDataModule(_MTANDataModule):
    """Cityscapes pre-processed by MTAN (128x256): 7- or 19-class segmentation (or one binary task per class), depth.

    Depth is MTAN's inverse depth. ``test`` and ``predict`` read ``val`` (500 images).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        num_classes: 7 (``label_7/`` or ``label/``) or 19 (``label_19/``).
        task_split: ``multiclass`` (``semseg``) or ``binary`` (``seg_<class>`` per class).
        tasks: subset of the tasks of the split (default: all).
        batch_size: images per training batch.
        kwargs: further options of :class:`~polytask.data.file_datamodule.FileDataModule` (``tasks``,
            ``eval_batch_size``, ``num_workers``, ``on_bad_samples``, ``predict_dir``, ``predict_size``).
    """

    name = "cityscapes_mtan"
    maximum_roaming_batch_size = 8  # cityscapes/train_*.py

    def __init__(
        self,
        root: str | Path,
        num_classes: Literal[7, 19] = 7,
        task_split: TaskSplit = "multiclass",
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        if num_classes not in (7, 19):
            raise ValueError(f"num_classes must be 7 or 19, got {num_classes!r}")
        self.num_classes = num_classes
        self.class_names = CITYSCAPES_7_CLASSES if num_classes == 7 else CITYSCAPES_19_CLASSES
        self.label_candidates = ("label_7", "label") if num_classes == 7 else ("label_19",)
        self.task_split = task_split
        super().__init__(root=root, batch_size=batch_size, **kwargs)

    def available_tasks(self) -> list[Task]:
        return [*segmentation_tasks(self.class_names, self.task_split), build_task("depth")]
