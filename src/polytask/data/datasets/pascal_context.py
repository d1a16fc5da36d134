"""PASCAL-Context, multi-task version (PASCAL_MT of ASTMT / MTI-Net / ATRC / InvPT).

Layout under ``root``::

    JPEGImages/<id>.jpg
    ImageSets/Context/{train,val}.txt        ids (4,998 / 5,105)
    semseg/VOC12/<id>.png                    21 classes, 255 = ignore; if absent:
    semseg/pascal-context/<id>.png           the same 21 classes
    human_parts/<id>.mat                     PASCAL-Part annotation struct
    sal_distill/<id>.png                     distilled saliency, grey levels
    normals_distill/<id>.png                 distilled normals, RGB
    pascal-context/trainval/<id>.mat         ``LabelMap``: the 459-class context labels

Decodings (equal to the reference loaders):

* ``semseg``: the PNG's values as class ids (255 ignore).
* ``human_parts``: the part masks of every person object (category 15) with parts, mapped to 6
  parts by :data:`PART_IDS`; other pixels background 0. An image without a person of non-empty
  mask, or whose persons carry no part pixel, is all-ignore (255).
* ``sal``: ``value / 255 > 0.5``.
* ``normals``: ``2 * value / 255 - 1``, kept on pixels whose context class is in
  :data:`NORMALS_VALID_CLASSES` (context classes that also exist in NYUD, plus tvmonitor), 0
  (invalid) elsewhere.
* ``edge``: ``thin(|Laplacian(LabelMap)| > 0)`` with the 4-neighbour Laplacian (OpenCV's
  ``ksize=1`` kernel, reflect-101 border) and scikit-image's ``thin``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from polytask.constants import IGNORE_INDEX
from polytask.data.file_datamodule import FileDataModule
from polytask.data.io import (
    DataFile,
    DataFileError,
    FileDataset,
    check_same_size,
    image_tensor,
    mat_array,
    normals_from_rgb,
    read_lines,
    read_mat,
    read_png,
    read_rgb,
)
from polytask.data.protocols import BoundaryProtocol, PublishedIdList
from polytask.data.transforms import check_size, eval_transform, train_transform
from polytask.ops.thinning import thin
from polytask.tasks import Task, build_task

CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PART_NAMES: tuple[str, ...] = ("background", "head", "torso", "upper_arms", "lower_arms", "upper_legs", "lower_legs")
PERSON_CATEGORY = 15
PART_IDS: dict[str, int] = {
    **dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("lhand", "llarm", "rhand", "rlarm"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("lfoot", "llleg", "rfoot", "rlleg"), 6),
}
"""PASCAL-Part person part names -> the 6 part classes of the multi-task benchmark."""

NORMALS_VALID_CLASSES: frozenset[int] = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51,
    53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107,
    111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183,
    184, 191, 193, 195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239,
    242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287,
    288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345,
    349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408,
    411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
))
"""Context classes (1-based ids of the 459-class ``LabelMap``) whose distilled normals are kept:
the 169 context class names that are also NYUD class names (except ``unknown``), plus tvmonitor (427)."""

TASKS: tuple[str, ...] = ("semseg", "human_parts", "sal", "normals", "edge")
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0}
SPLITS: tuple[str, ...] = ("train", "val")

SEISM_TEST_NEW = PublishedIdList(
    sha256="1998ea178a4683c851a7db0c5c6d41dcbc026e9502d4a6f10bb3668862cff0ce",
    size=2498,
    path="seism/src/gt_wrappers/gt_sets/PASCALContext/test_new.txt",
    dataset_title="PASCAL-Context",
)
"""SEISM's ``src/gt_wrappers/gt_sets/PASCALContext/test_new.txt``: 2,498 val ids (sorted, one per
line with a final newline), recognised by its hash without shipping it."""

BOUNDARY_PROTOCOL = BoundaryProtocol(max_dist=0.0075, ground_truth="seg2bmap(LabelMap)", test_new=SEISM_TEST_NEW)
"""SEISM's PASCAL-Context set-up (InvPT / ATRC / ASTMT): tolerance 0.0075 of the diagonal, ground
truth the segment boundaries of the context ``LabelMap`` (:meth:`PascalContext.seism_label_map`),
published numbers on ``test_new``."""

_LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
# Positions in the PASCAL-Part struct: anno = (imname, objects); object = (class, class_ind, mask,
# parts); part = (part_name, mask).
_ANNO_OBJECTS, _OBJ_CLASS_IND, _OBJ_MASK, _OBJ_PARTS, _PART_NAME, _PART_MASK = 1, 1, 2, 3, 0, 1


def boundary_map(label_map: np.ndarray) -> np.ndarray:
    """Boundaries of a label map: ``thin(|Laplacian(label_map)| > 0)``, float32 ``(H, W)`` in {0, 1}."""
    laplacian = ndimage.convolve(label_map.astype(np.float64), _LAPLACIAN, mode="mirror")
    return thin(np.abs(laplacian) > 0).astype(np.float32)


def normals_from_png(rgb: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """Distilled normals: RGB uint8 ``(H, W, 3)`` and context ``LabelMap`` ``(H, W)`` -> float32 ``(3, H, W)``.

    ``n = 2 * value / 255 - 1`` on pixels of a class in :data:`NORMALS_VALID_CLASSES`, 0 elsewhere.
    """
    normals = normals_from_rgb(rgb)
    valid = np.isin(label_map, np.fromiter(NORMALS_VALID_CLASSES, dtype=np.int64))
    normals[~valid] = 0.0
    return np.ascontiguousarray(normals.transpose(2, 0, 1))


def human_parts_from_annotation(anno: np.ndarray, shape: tuple[int, int], path: Path) -> np.ndarray:
    """Part labels int64 ``(H, W)`` from a PASCAL-Part ``anno`` struct (as loaded by ``scipy.io.loadmat``).

    Raises:
        DataFileError: malformed struct, unknown part name, or masks not of ``shape``.
    """
    try:
        objects = list(np.asarray(anno[0, 0][_ANNO_OBJECTS]).ravel())
        persons = [obj for obj in objects if int(np.asarray(obj[_OBJ_CLASS_IND]).ravel()[0]) == PERSON_CATEGORY]
        has_person = any(np.asarray(obj[_OBJ_MASK]).sum() > 0 for obj in persons)
        target = np.zeros(shape, dtype=np.int64)
        for obj in persons if has_person else []:
            for part in np.asarray(obj[_OBJ_PARTS]).ravel():
                name = str(np.asarray(part[_PART_NAME]).ravel()[0])
                if name not in PART_IDS:
                    raise DataFileError(path, "out_of_range", f"unknown person part name {name!r}")
                mask = np.asarray(part[_PART_MASK]).astype(bool)
                check_same_size(mask.shape, shape, path)
                target[mask] = PART_IDS[name]
    except (IndexError, TypeError, ValueError, KeyError) as err:
        raise DataFileError(path, "format", f"not a PASCAL-Part annotation struct ({err})") from err
    if not (target != 0).any():
        target.fill(IGNORE_INDEX)
    return target


class PascalContext(FileDataset):
    """One split of PASCAL_MT (see the module docstring for layout and decodings).

    Args:
        root: the PASCAL_MT directory.
        split: ``train`` or ``val``.
        tasks: tasks to decode (from :data:`TASKS`).
        transform: applied to every sample dict.
    """

    def __init__(self, root: Path, split: str, tasks: Sequence[Task], transform: Callable[[dict], dict] | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"PASCAL-Context split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root)
        super().__init__(read_lines(split_file(self.root, split)), tasks, transform)

    def _semseg_path(self, sample: str) -> Path:
        voc = self.root / "semseg" / "VOC12" / f"{sample}.png"
        context = self.root / "semseg" / "pascal-context" / f"{sample}.png"
        return context if not voc.is_file() and context.is_file() else voc

    def _context_path(self, sample: str) -> Path:
        return self.root / "pascal-context" / "trainval" / f"{sample}.mat"

    def files(self, index: int) -> dict[str, DataFile]:
        sample = self.ids[index]
        files = {"image": DataFile(self.root / "JPEGImages" / f"{sample}.jpg")}
        if "semseg" in self.tasks:
            files["semseg"] = DataFile(self._semseg_path(sample))
        if "human_parts" in self.tasks:
            files["human_parts"] = DataFile(self.root / "human_parts" / f"{sample}.mat", spatial=False)
        if "sal" in self.tasks:
            files["sal"] = DataFile(self.root / "sal_distill" / f"{sample}.png")
        if "normals" in self.tasks:
            files["normals"] = DataFile(self.root / "normals_distill" / f"{sample}.png")
        if "normals" in self.tasks or "edge" in self.tasks:
            files["context"] = DataFile(self._context_path(sample), mat_key="LabelMap")
        return files

    def target_file(self, index: int, task: str) -> Path:
        if task == "edge":
            return self._context_path(self.ids[index])
        return super().target_file(index, task)

    def load_image(self, index: int) -> torch.Tensor:
        return image_tensor(read_rgb(self.root / "JPEGImages" / f"{self.ids[index]}.jpg"))

    def seism_label_map(self, index: int, boundary_target: torch.Tensor) -> np.ndarray:
        """SEISM's PASCAL-Context ground truth (``db_gt``): the context ``LabelMap``, not the
        Laplacian training target."""
        return mat_array(self._context_path(self.ids[index]), "LabelMap")

    def _label_map(self, index: int, shape: tuple[int, int]) -> np.ndarray:
        path = self._context_path(self.ids[index])
        label_map = mat_array(path, "LabelMap")
        check_same_size(label_map.shape, shape, path)
        return label_map

    def load_target(self, index: int, task: str) -> torch.Tensor:
        sample = self.ids[index]
        shape = self.image_size(index)
        if task == "semseg":
            path = self._semseg_path(sample)
            labels = read_png(path, 1)
            check_same_size(labels.shape, shape, path)
            return torch.from_numpy(labels.astype(np.int64))
        if task == "human_parts":
            path = self.root / "human_parts" / f"{sample}.mat"
            variables = read_mat(path)
            if "anno" not in variables:
                raise DataFileError(path, "format", "no variable 'anno' (not a PASCAL-Part annotation)")
            return torch.from_numpy(human_parts_from_annotation(variables["anno"], shape, path))
        if task == "sal":
            path = self.root / "sal_distill" / f"{sample}.png"
            sal = read_png(path, 1)
            check_same_size(sal.shape, shape, path)
            return torch.from_numpy((sal.astype(np.float32) / 255.0 > 0.5).astype(np.int64))
        if task == "normals":
            path = self.root / "normals_distill" / f"{sample}.png"
            rgb = read_png(path, 3)
            check_same_size(rgb.shape, shape, path)
            return torch.from_numpy(normals_from_png(rgb, self._label_map(index, shape)))
        if task == "edge":
            return torch.from_numpy(boundary_map(self._label_map(index, shape))[None])
        raise KeyError(f"PASCAL-Context has no task {task!r}")


def split_file(root: Path, split: str) -> Path:
    """The id list of ``split``: ``ImageSets/Context/<split>.txt``."""
    return Path(root) / "ImageSets" / "Context" / f"{split}.txt"


class PascalContextDataModule(FileDataModule):
    """PASCAL-Context multi-task (PASCAL_MT): semseg, human_parts, sal, normals, edge.

    Training uses the ATRC / InvPT augmentation at ``train_size``; evaluation pads to ``eval_size``
    (labels with 255); ``test`` and ``predict`` read the ``val`` split.

    Args:
        root: the PASCAL_MT directory.
        tasks: subset of :data:`TASKS` (default: all).
        train_size: ``(h, w)`` of training crops.
        eval_size: ``(h, w)`` evaluation images are padded to.
        batch_size: images per training batch.
        kwargs: further options of :class:`~polytask.data.file_datamodule.FileDataModule` (``tasks``,
            ``eval_batch_size``, ``num_workers``, ``on_bad_samples``, ``predict_dir``, ``predict_size``).
    """

    name = "pascal_context"
    boundary_protocol = BOUNDARY_PROTOCOL

    def __init__(
        self,
        root: str | Path,
        train_size: tuple[int, int] = (512, 512),
        eval_size: tuple[int, int] = (512, 512),
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        self.train_size = check_size(train_size, "train_size")
        self.eval_size = check_size(eval_size, "eval_size")
        super().__init__(root=root, batch_size=batch_size, **kwargs)

    def available_tasks(self) -> list[Task]:
        return [
            build_task("semseg", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES),
            build_task("human_parts", num_classes=len(PART_NAMES), class_names=PART_NAMES),
            build_task("sal"),
            build_task("normals"),
            build_task("edge"),
        ]

    def default_loss_weights(self) -> Mapping[str, float]:
        return DEFAULT_LOSS_WEIGHTS

    def build_split(self, split: str, tasks: Sequence[Task]) -> PascalContext:
        return PascalContext(self.root, split, tasks)

    def listing_files(self, split: str) -> list[Path]:
        return [split_file(self.root, split)]

    def make_transform(self, split: str) -> Callable[[dict], dict]:
        if split == "train":
            return train_transform(self.train_size, self.tasks)
        return eval_transform(self.eval_size, self.tasks)
