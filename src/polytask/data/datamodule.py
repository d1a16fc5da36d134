"""Lightning datamodules: the base class and the SynthScenes datamodule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from polytask.tasks import Task, build_task, select_tasks


class MultiTaskDataModule(pl.LightningDataModule):
    """Base datamodule: declares the tasks a dataset carries and their default loss weights.

    Subclasses implement :meth:`available_tasks`, :meth:`default_loss_weights` and :meth:`make_dataset`.

    Args:
        tasks: names of the tasks to train (default: every task the dataset carries).
        batch_size: images per batch (per process).
        eval_batch_size: batch size for validation/test/predict (default ``batch_size``).
        num_workers: DataLoader worker processes.
    """

    name = "dataset"

    def __init__(self, tasks: Sequence[str] | None = None, batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 0) -> None:
        super().__init__()
        self.tasks: list[Task] = select_tasks(self.available_tasks(), tasks, self.name)
        self.task_names = [t.name for t in self.tasks]
        weights = self.default_loss_weights()
        self.loss_weights: dict[str, float] = {n: weights[n] for n in self.task_names}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset] = {}

    def available_tasks(self) -> list[Task]:
        """Every task the dataset carries, with its options."""
        raise NotImplementedError

    def default_loss_weights(self) -> Mapping[str, float]:
        """The dataset's default loss weight of every task it carries."""
        raise NotImplementedError

    def make_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``train``, ``val``, ``test``, ``predict``) restricted to ``self.task_names``."""
        raise NotImplementedError

    def _dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            self.datasets[split] = self.make_dataset(split)
        return self.datasets[split]

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", False, self.eval_batch_size)


class SynthScenesDataModule(MultiTaskDataModule):
    """SynthScenes: the embedded procedurally generated dataset (no download).

    Args:
        tasks: subset of semseg, depth, normals, edge, sal, human_parts (default: all).
        num_train: training scenes.
        num_val: scenes of the validation split and of the test split (``test`` and ``predict`` use the latter).
        image_size: ``(H, W)`` of rendered images.
        seed: base seed; every scene is a deterministic function of (seed, split, index).
        flip: random horizontal flips during training.
        cache_dir: where rendered splits are cached (default ``$POLYTASK_CACHE`` or ``~/.cache/polytask``).
        batch_size, eval_batch_size, num_workers: as in :class:`MultiTaskDataModule`.
    """

    name = "synthscenes"

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        num_train: int = 2000,
        num_val: int = 200,
        image_size: tuple[int, int] = (96, 128),
        seed: int = 0,
        flip: bool = True,
        cache_dir: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
    ) -> None:
        self.num_train = num_train
        self.num_val = num_val
        self.image_size = tuple(image_size)
        self.seed = seed
        self.flip = flip
        self.cache_dir = Path(cache_dir) if cache_dir else None
        super().__init__(tasks, batch_size, eval_batch_size, num_workers)

    def available_tasks(self) -> list[Task]:
        from polytask.data.synthscenes import CLASS_NAMES, PART_NAMES

        return [
            build_task("semseg", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES),
            build_task("depth"),
            build_task("normals"),
            build_task("edge"),
            build_task("sal"),
            build_task("human_parts", num_classes=len(PART_NAMES), class_names=PART_NAMES),
        ]

    def default_loss_weights(self) -> Mapping[str, float]:
        from polytask.data.synthscenes import DEFAULT_LOSS_WEIGHTS

        return DEFAULT_LOSS_WEIGHTS

    def make_dataset(self, split: str) -> Dataset:
        from polytask.data.synthscenes import SynthScenes
        from polytask.data.transforms import RandomHorizontalFlip

        train = split == "train"
        return SynthScenes(
            split="test" if split == "predict" else split,
            num_samples=self.num_train if train else self.num_val,
            image_size=self.image_size,
            seed=self.seed,
            tasks=self.task_names,
            cache_dir=self.cache_dir,
            transform=RandomHorizontalFlip() if (train and self.flip) else None,
        )
