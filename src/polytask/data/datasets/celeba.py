"""CelebA with the 40 attributes grouped into 8 image-level tasks (Maximum Roaming / ETR-NLP protocol).

Layout under ``root`` (the official release, flat as torchvision keeps it, or in the
``Img/``, ``Anno/``, ``Eval/`` folders of the Google Drive / Baidu release)::

    img_align_celeba/<000001>.jpg          or Img/img_align_celeba/
    list_attr_celeba.txt                   or Anno/list_attr_celeba.txt
    list_eval_partition.txt                or Eval/list_eval_partition.txt

``list_attr_celeba.txt``: a count line, a line of the 40 attribute names, then one line per image
(file name and 40 values in {-1, 1}). ``list_eval_partition.txt``: file name and split code
(0 train, 1 val, 2 test). Labels -1 / 1 -> 0 / 1. Images are resized so their short side is
``image_size`` (178x218 -> 64x78 by default; PIL bilinear, as torchvision's ``Resize``), then
ImageNet-normalised; no augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polytask.data.file_datamodule import FileDataModule
from polytask.data.io import DataFile, DataFileError, FileDataset, image_tensor, read_resized_rgb, require_file
from polytask.data.transforms import eval_transform
from polytask.tasks import Task, build_task

ATTRIBUTE_GROUPS: dict[str, tuple[int, ...]] = {
    "global": (2, 10, 13, 14, 18, 20, 25, 26, 39),
    "eyes": (3, 15, 23, 1, 12),
    "hair": (4, 5, 8, 9, 11, 17, 28, 32, 33),
    "mouth": (6, 21, 31, 36),
    "nose": (7, 27),
    "beard": (0, 16, 22, 24, 30),
    "cheeks": (19, 29),
    "accessories": (34, 35, 37, 38),
}
"""Column indices (0-based, file order) of each group's attributes, in Maximum Roaming's order."""

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1, "test": 2}
NUM_ATTRIBUTES = 40


@dataclass(frozen=True)
class CelebALayout:
    """Where the images, the attribute table and the partition file of a CelebA root are."""

    images: Path
    attributes: Path
    partition: Path


def find_layout(root: Path) -> CelebALayout:
    """The flat or the ``Img/Anno/Eval`` layout of ``root``.

    Raises:
        DataFileError: (``layout``) neither layout is complete.
    """
    root = Path(root)
    for images, attributes, partition in (
        ("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"),
        ("Img/img_align_celeba", "Anno/list_attr_celeba.txt", "Eval/list_eval_partition.txt"),
    ):
        layout = CelebALayout(root / images, root / attributes, root / partition)
        if layout.images.is_dir() and layout.attributes.is_file() and layout.partition.is_file():
            return layout
    raise DataFileError(
        root, "layout",
        "not a CelebA root: expected img_align_celeba/, list_attr_celeba.txt and list_eval_partition.txt "
        "(directly or as Img/img_align_celeba/, Anno/..., Eval/...)",
    )


def read_attribute_names(path: Path) -> list[str]:
    """The 40 attribute names of the header (second line) of ``list_attr_celeba.txt``."""
    with require_file(path).open() as f:
        f.readline()
        names = f.readline().split()
    if len(names) != NUM_ATTRIBUTES:
        raise DataFileError(path, "format", f"expected {NUM_ATTRIBUTES} attribute names on line 2, found {len(names)}")
    return names


@dataclass(frozen=True)
class AttributeTable:
    """Raw attribute values as stored (-1 / 1): ``values`` int8 ``(N, 40)``, ``rows`` maps file names to row indices."""

    rows: dict[str, int]
    values: np.ndarray


def read_attribute_table(path: Path) -> AttributeTable:
    """Parse ``list_attr_celeba.txt`` (lines after the two header lines)."""
    names: list[str] = []
    values: list[list[str]] = []
    with require_file(path).open() as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if number <= 2 or not fields:
                continue
            if len(fields) != NUM_ATTRIBUTES + 1:
                raise DataFileError(path, "format", f"line {number}: expected a file name and {NUM_ATTRIBUTES} values")
            names.append(fields[0])
            values.append(fields[1:])
    try:
        table = np.array(values, dtype=np.int64).reshape(len(names), NUM_ATTRIBUTES)
    except ValueError as err:
        raise DataFileError(path, "format", f"non-integer attribute value ({err})") from err
    if table.size and (table.min() < np.iinfo(np.int8).min or table.max() > np.iinfo(np.int8).max):
        raise DataFileError(path, "format", "attribute values far outside {-1, 1}")
    return AttributeTable({name: i for i, name in enumerate(names)}, table.astype(np.int8))


def read_partition(path: Path) -> dict[str, int]:
    """Split code (0 train, 1 val, 2 test) by file name, in file order."""
    partition: dict[str, int] = {}
    with require_file(path).open() as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit():
                raise DataFileError(path, "format", f"line {number}: expected a file name and a split code")
            partition[fields[0]] = int(fields[1])
    return partition


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(h, w)`` with the short side ``short_side`` and the long side ``int(short_side * long / short)`` (torchvision rule)."""
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


class CelebA(FileDataset):
    """One split of CelebA with grouped attribute targets (float32 ``(K,)`` in {0, 1} per group).

    Args:
        layout: where the files are (:func:`find_layout`).
        split: ``train``, ``val`` or ``test``.
        tasks: attribute-group tasks (names from :data:`ATTRIBUTE_GROUPS`).
        table: raw attribute values (:func:`read_attribute_table`).
        partition: split codes by file name (:func:`read_partition`).
        image_size: short side of the resized images.
        transform: applied to every sample dict.
    """

    def __init__(
        self,
        layout: CelebALayout,
        split: str,
        tasks: Sequence[Task],
        table: AttributeTable,
        partition: Mapping[str, int],
        image_size: int = 64,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        if split not in SPLIT_CODES:
            raise ValueError(f"CelebA split must be one of {tuple(SPLIT_CODES)}, got {split!r}")
        self.layout = layout
        self.table = table
        self.image_size_short = image_size
        code = SPLIT_CODES[split]
        super().__init__([name for name, c in partition.items() if c == code], tasks, transform)

    def files(self, index: int) -> dict[str, DataFile]:
        return {"image": DataFile(self.layout.images / self.ids[index])}

    def target_file(self, index: int, task: str) -> Path:
        return self.layout.attributes

    def load_image(self, index: int) -> torch.Tensor:
        height, width = self.image_size(index)
        size = resized_size(height, width, self.image_size_short)
        return image_tensor(read_resized_rgb(self.layout.images / self.ids[index], size))

    def load_target(self, index: int, task: str) -> torch.Tensor:
        sample = self.ids[index]
        row = self.table.rows.get(sample)
        if row is None:
            raise DataFileError(self.layout.attributes, "missing", f"no attribute row for {sample}")
        raw = self.table.values[row, list(ATTRIBUTE_GROUPS[task])]
        if not np.isin(raw, (-1, 1)).all():
            raise DataFileError(self.layout.attributes, "out_of_range", f"{sample}: attribute values {sorted(set(raw.tolist()))} not in {{-1, 1}}")
        return torch.from_numpy((raw == 1).astype(np.float32))


class CelebADataModule(FileDataModule):
    """CelebA, 8 grouped attribute tasks: global, eyes, hair, mouth, nose, beard, cheeks, accessories.

    Attribute names come from the header of ``list_attr_celeba.txt``. Splits follow the official
    partition; ``predict`` reads ``test``.

    Args:
        root: the CelebA directory (see the module docstring).
        tasks: subset of the groups (default: all 8).
        image_size: short side of the resized images (64 -> 64x78).
        batch_size: images per training batch.
        kwargs: further options of :class:`~polytask.data.file_datamodule.FileDataModule` (``tasks``,
            ``eval_batch_size``, ``num_workers``, ``on_bad_samples``, ``predict_dir``, ``predict_size``).

    Raises:
        DataFileError: the layout is incomplete or the attribute header is malformed.
    """

    name = "celeba"
    # Attribute predictions have no file format: CelebA is scored in memory only (where Maximum
    # Roaming's batch size of 256, celeba/train_*.py, is the default batch_size below).
    prediction_files = False
    disk_splits = ("train", "val", "test")
    stage_splits = {"train": "train", "val": "val", "test": "test", "predict": "test"}

    def __init__(
        self,
        root: str | Path,
        image_size: int = 64,
        batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        self.layout = find_layout(Path(root).expanduser())
        self.attribute_names = read_attribute_names(self.layout.attributes)
        self.image_size = image_size
        self._table: AttributeTable | None = None
        self._partition: dict[str, int] | None = None
        super().__init__(root=root, batch_size=batch_size, **kwargs)

    def available_tasks(self) -> list[Task]:
        return [
            build_task("attributes", name=group, attribute_names=[self.attribute_names[i] for i in columns])
            for group, columns in ATTRIBUTE_GROUPS.items()
        ]

    def default_loss_weights(self) -> Mapping[str, float]:
        return dict.fromkeys(ATTRIBUTE_GROUPS, 1.0)

    def build_split(self, split: str, tasks: Sequence[Task]) -> CelebA:
        if self._table is None or self._partition is None:
            self._table = read_attribute_table(self.layout.attributes)
            self._partition = read_partition(self.layout.partition)
        groups = [t for t in tasks if t.name in ATTRIBUTE_GROUPS]
        return CelebA(self.layout, split, groups, self._table, self._partition, self.image_size)

    def listing_files(self, split: str) -> list[Path]:
        return [self.layout.attributes, self.layout.partition]

    def make_transform(self, split: str) -> Callable[[dict], dict]:
        return eval_transform(None, self.tasks)
