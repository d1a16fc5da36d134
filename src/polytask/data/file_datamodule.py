"""The base of the datamodules of datasets stored as files: ``setup()`` runs the quick
(header-level) check of :mod:`polytask.data.problems`, cached per split until a file changes, and
stops with the list of bad samples unless ``on_bad_samples="skip"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from polytask.data.datamodule import MultiTaskDataModule
from polytask.data.io import DataFileError, FileDataset
from polytask.data.problems import BrokenDatasetError, Problem, cached_quick_check
from polytask.data.protocols import BoundaryProtocol
from polytask.tasks import Task

log = logging.getLogger(__name__)


_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
    None: ("train", "val", "test", "predict"),
}


_MAX_LISTED = 20


class FileDataModule(MultiTaskDataModule):
    """Base of the datamodules of datasets stored as files under ``root``.

    Subclasses implement :meth:`build_split` and :meth:`make_transform` (plus the task methods of
    :class:`MultiTaskDataModule`), and list their on-disk splits in ``disk_splits`` and the split
    each stage split reads in ``stage_splits``.

    What ``polytask evaluate`` needs to know of the dataset's published protocols is declared in
    class attributes (read from the class, found by name in :func:`polytask.data.registry.registry`):

    * ``prediction_files``: its tasks' predictions can be saved as files (each has a
      :attr:`~polytask.tasks.Task.prediction_format`), so ``polytask evaluate`` can score them.
    * ``boundary_protocol``: how its published results score boundaries with SEISM
      (:class:`~polytask.data.protocols.BoundaryProtocol`); None: by the training monitor F_tol only.
    * ``maximum_roaming_batch_size``: the batch size of the evaluation loop of Maximum Roaming's
      scripts on the dataset (their ``--batch_size`` default); ``--protocol maximum_roaming``
      averages over batches of that many consecutive files, as they do. None: that protocol is
      not defined for the dataset's files.

    Args:
        root: the dataset directory.
        on_bad_samples: what ``setup()`` does when the quick check finds bad samples: ``error``
            stops with their list; ``skip`` leaves them out and logs which.
        kwargs: the options of :class:`~polytask.data.datamodule.MultiTaskDataModule` (``tasks``,
            ``batch_size``, ``eval_batch_size``, ``num_workers``, ``predict_dir``, ``predict_size``).
    """

    disk_splits: ClassVar[tuple[str, ...]] = ("train", "val")
    stage_splits: ClassVar[dict[str, str]] = {"train": "train", "val": "val", "test": "val", "predict": "val"}
    prediction_files: ClassVar[bool] = True
    boundary_protocol: ClassVar[BoundaryProtocol | None] = None
    maximum_roaming_batch_size: ClassVar[int | None] = None

    def __init__(
        self,
        root: str | Path,
        on_bad_samples: Literal["error", "skip"] = "error",
        **kwargs: Any,
    ) -> None:
        if on_bad_samples not in ("error", "skip"):
            raise ValueError(f"on_bad_samples must be 'error' or 'skip', got {on_bad_samples!r}")
        self.root = Path(root).expanduser()
        self.on_bad_samples = on_bad_samples
        super().__init__(**kwargs)

    def build_split(self, split: str, tasks: Sequence[Task]) -> FileDataset:
        """The untransformed dataset of on-disk ``split`` decoding ``tasks``.

        Raises:
            DataFileError: the split cannot be listed (missing split file or folder).
        """
        raise NotImplementedError

    def make_transform(self, split: str) -> Callable[[dict], dict] | None:
        """The transform of stage split ``split`` (``train``, ``val``, ``test``, ``predict``)."""
        raise NotImplementedError

    def layout_notes(self) -> list[str]:
        """Facts about the layout found under ``root``, shown by ``polytask data check``."""
        return []

    def listing_files(self, split: str) -> list[Path]:
        """Files besides the samples' own that define ``split`` (split lists, label tables)."""
        return []

    def preflight(self, stage: str | None) -> list[str]:
        """The splits ``stage`` reads that cannot be listed under ``root`` (see :meth:`MultiTaskDataModule.preflight`)."""
        problems = []
        for split in _STAGE_SPLITS[stage]:
            if split == "predict" and self.predict_dir is not None:
                continue
            disk_split = self.stage_splits[split]
            try:
                self.build_split(disk_split, self.tasks)
            except DataFileError as err:
                problems.append(
                    f"{self.name} split {disk_split!r}: {err.path}: {err.detail} "
                    f"(the dataset root is {self.root}; point --data.init_args.root at the dataset directory)"
                )
        return list(dict.fromkeys(problems))

    def make_dataset(self, split: str) -> FileDataset:
        dataset = self.build_split(self.stage_splits[split], self.tasks)
        dataset.transform = self.make_transform(split)
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` and run the quick check on each (see ``on_bad_samples``).

        With ``predict_dir`` set, the dataset's predict split is neither built nor checked: predict
        runs on that folder's images (:meth:`MultiTaskDataModule.predict_dataloader`).
        """
        for split in _STAGE_SPLITS[stage]:
            if split in self.datasets or (split == "predict" and self.predict_dir is not None):
                continue
            dataset = self.make_dataset(split)
            disk_split = self.stage_splits[split]
            problems = cached_quick_check(self.name, self.root, dataset, disk_split, self.listing_files(disk_split))
            if problems:
                self._bad_samples(dataset, disk_split, problems)
            self.datasets[split] = dataset

    def _bad_samples(self, dataset: FileDataset, split: str, problems: Sequence[Problem]) -> None:
        bad = sorted({p.sample for p in problems})
        listing = "\n".join(f"  {p.sample}: {p.path}: {p.detail}" for p in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        if self.on_bad_samples == "skip":
            dataset.drop(set(bad))
            log.warning(
                "%s split %r: skipping %d bad sample(s) of %d: %s\n%s%s",
                self.name, split, len(bad), len(bad) + len(dataset), ", ".join(bad), listing, more,
            )
            return
        message = (
            f"{self.name} at {self.root}: {len(bad)} bad sample(s) in split {split!r}:\n{listing}{more}\n"
            f"Run `polytask data check --dataset {self.name} --root {self.root}` for the full report, "
            "or set on_bad_samples: skip to train without them."
        )
        raise BrokenDatasetError(message, problems)
