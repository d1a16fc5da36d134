"""Lightning datamodules: the base class and its resumable training loader (datasets are in :mod:`polytask.data.datasets`)."""

from __future__ import annotations

import difflib
import random
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from polytask.tasks import TASK_REGISTRY, Task, select_tasks


def _mix(*values: int) -> int:
    """A 64-bit seed derived from non-negative ints (``numpy.random.SeedSequence``)."""
    state = np.random.SeedSequence(list(values)).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


class ResumableSampler(DistributedSampler):
    """Training order that depends only on ``(seed, epoch)`` and can resume mid-epoch.

    Every epoch is a permutation drawn from ``(seed, epoch)``; process ``rank`` of
    ``num_replicas`` takes the positions ``rank, rank + num_replicas, ...`` (padded like
    ``DistributedSampler``). Items are ``(index, sample_seed)``: :class:`SeededSamples` draws the
    random augmentation of the sample at position ``p`` from ``sample_seed = f(seed, epoch, p)``,
    so an epoch's batches are the same whatever happened before (workers, restarts, world size).
    Being a ``DistributedSampler``, Lightning keeps it in distributed runs and calls ``set_epoch``.

    Args:
        dataset: the training dataset (only its length is used).
        seed: seed of the order and of the augmentation.
        num_replicas, rank: the process group (1 and 0 outside distributed runs).
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, positions: int) -> None:
        """Make the next iteration run ``epoch`` from global position ``positions`` (already consumed)."""
        self.epoch = epoch
        self._resume = (epoch, positions)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator).tolist()
        order = (order * (self.total_size // n + 1))[: self.total_size]
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        first = start + (self.rank - start) % self.num_replicas
        for position in range(first, self.total_size, self.num_replicas):
            yield order[position], _mix(self.seed, self.epoch, position)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's, NumPy's and Python's global generators inside the block; restore them after."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


class SeededSamples(Dataset):
    """Wraps a dataset: item ``(index, seed)`` is ``dataset[index]`` computed with the global
    generators seeded by ``seed`` (random transforms become a function of the seed); a plain
    ``index`` is passed through unchanged.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if isinstance(item, tuple):
            index, seed = item
            with _seeded(seed):
                return self.dataset[index]
        return self.dataset[item]


class ResumableLoader(DataLoader):
    """The training ``DataLoader``: a :class:`ResumableSampler` over :class:`SeededSamples`, whose
    position (``state_dict``) goes into checkpoints and is restored on resume (``load_state_dict``;
    :class:`MultiTaskDataModule` applies it, and Lightning's loop too when it can).

    Args:
        dataset: the training dataset, wrapped in :class:`SeededSamples`.
        sampler: its :class:`ResumableSampler`.
        consumed_batches: returns how many batches of the current epoch training has consumed
            (Lightning's batch counter: the loader itself prefetches ahead).
        kwargs: further ``DataLoader`` arguments (``batch_size``, ``num_workers``...).
    """

    def __init__(
        self, dataset: SeededSamples, sampler: ResumableSampler, consumed_batches: Callable[[], int], **kwargs: Any
    ) -> None:
        super().__init__(dataset, sampler=sampler, drop_last=True, **kwargs)
        self.consumed_batches = consumed_batches

    def state_dict(self) -> dict[str, int]:
        """Seed, epoch and consumed batches, as plain ints."""
        sampler = self.sampler
        return {
            "seed": int(sampler.seed),
            "epoch": int(sampler.epoch),
            "batches": int(self.consumed_batches()),
            "batch_size": int(self.batch_size),
            "num_replicas": int(sampler.num_replicas),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue after the consumed batches (or at the next epoch when the epoch was complete)."""
        if not isinstance(self.sampler, ResumableSampler):
            rank_zero_warn(f"the training sampler was replaced by a {type(self.sampler).__name__}: the resumed epoch restarts")
            return
        if (state["batch_size"], state["num_replicas"]) != (self.batch_size, self.sampler.num_replicas):
            rank_zero_warn(
                f"resuming with batch size {self.batch_size} on {self.sampler.num_replicas} process(es); the checkpoint "
                f"used {state['batch_size']} on {state['num_replicas']}: the order resumes by sample, not exactly"
            )
        self.sampler.seed = state["seed"]
        if state["batches"] >= len(self):
            self.sampler.resume(state["epoch"] + 1, 0)
        else:
            self.sampler.resume(state["epoch"], state["batches"] * state["batch_size"] * state["num_replicas"])


class MultiTaskDataModule(pl.LightningDataModule):
    """Base datamodule: declares the tasks a dataset carries and their default loss weights.

    Subclasses implement :meth:`available_tasks`, :meth:`default_loss_weights` and :meth:`make_dataset`.

    Args:
        tasks: names of the tasks to train (default: every task the dataset carries).
        batch_size: images per batch (per process).
        eval_batch_size: batch size for validation/test/predict (default ``batch_size``).
        num_workers: DataLoader worker processes.
        predict_dir: a folder of images; when set, ``predict`` runs on every image in it (see
            :class:`polytask.data.predict.ImageFolder`) instead of the dataset's predict split.
        predict_size: ``(H, W)`` the ``predict_dir`` images are resized to (batched by
            ``eval_batch_size``); default: their own size, one image per batch.

    The training loader is a :class:`ResumableLoader`: its order depends only on the seed (the
    global seed, ``seed_everything``) and the epoch, random augmentation is seeded per sample,
    and its position is saved in checkpoints, so a resumed run sees exactly the batches an
    uninterrupted run would.
    """

    name = "dataset"

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        predict_dir: str | None = None,
        predict_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self._check_task_names(tasks)
        self.tasks: list[Task] = select_tasks(self.available_tasks(), tasks, self.name)
        self.task_names = [t.name for t in self.tasks]
        weights = self.default_loss_weights()
        self.loss_weights: dict[str, float] = {n: weights[n] for n in self.task_names}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.predict_dir = Path(predict_dir).expanduser() if predict_dir is not None else None
        if self.predict_dir is not None and not self.predict_dir.is_dir():
            raise ValueError(f"{type(self).__name__}: predict_dir {self.predict_dir} is not an existing folder")
        self.predict_size = (int(predict_size[0]), int(predict_size[1])) if predict_size is not None else None
        self.datasets: dict[str, Dataset] = {}
        self._train_loader: ResumableLoader | None = None
        self._resume_state: dict[str, int] | None = None

    def _check_task_names(self, names: Sequence[str] | None) -> None:
        """Raise a ValueError naming unknown tasks (with close matches) and tasks the dataset lacks."""
        carried = [t.name for t in self.available_tasks()]
        wrong = [n for n in names or [] if n not in carried]
        if not wrong:
            return
        notes = []
        for name in wrong:
            close = difflib.get_close_matches(name, carried, n=1)
            if close:
                notes.append(f"{name!r}: did you mean {close[0]!r}?")
            elif name in TASK_REGISTRY:
                notes.append(f"{name!r}: a polytask task this dataset does not carry")
            else:
                notes.append(f"{name!r}: not a task polytask knows")
        raise ValueError(
            f"{type(self).__name__} ({self.name}): unknown task(s) {wrong} in data.tasks ({'; '.join(notes)}); "
            f"the dataset carries {carried}"
        )

    def available_tasks(self) -> list[Task]:
        """Every task the dataset carries, with its options."""
        raise NotImplementedError

    def default_loss_weights(self) -> Mapping[str, float]:
        """The dataset's default loss weight of every task it carries."""
        raise NotImplementedError

    def preflight(self, stage: str | None) -> list[str]:
        """Problems that would stop ``stage`` (``fit``, ``validate``, ``test``, ``predict``) before any
        model is built: one sentence each, naming the file and the option that fixes it. Cheap
        (no sample is decoded); the default finds none."""
        return []

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
            generator=torch.Generator().manual_seed(torch.initial_seed()),
        )

    def train_dataloader(self) -> DataLoader:
        """A :class:`ResumableLoader` (a plain shuffling loader for iterable datasets)."""
        dataset = self._dataset("train")
        if isinstance(dataset, IterableDataset):
            return self._loader("train", False, self.batch_size)
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"{type(self).__name__} ({self.name}): the training split has {len(dataset)} samples, "
                f"fewer than one batch of {self.batch_size}"
            )
        replicas, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)
        sampler = ResumableSampler(dataset, torch.initial_seed(), replicas, rank)
        loader = ResumableLoader(
            SeededSamples(dataset),
            sampler,
            self._consumed_batches,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(torch.initial_seed()),
        )
        if self._resume_state is not None:
            loader.load_state_dict(self._resume_state)
            self._resume_state = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (saved in checkpoints by Lightning)."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved position for the next :meth:`train_dataloader`.

        Lightning restores the datamodule before it builds the training loader, whereas the
        loader's own state (``ResumableLoader.load_state_dict``) is not applied when the loader
        is built early (``configure_optimizers`` asking for ``estimated_stepping_batches``).
        """
        self._resume_state = state_dict.get("train_loader")

    def _consumed_batches(self) -> int:
        """Training batches of the current epoch that the fit loop has taken (0 without a trainer)."""
        trainer = self.trainer
        return trainer.fit_loop.epoch_loop.batch_idx + 1 if trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The predict split, or every image of ``predict_dir`` when it is set."""
        if self.predict_dir is None:
            return self._loader("predict", False, self.eval_batch_size)
        from polytask.data.predict import ImageFolder

        if "predict" not in self.datasets:
            folder = ImageFolder(self.predict_dir, self.predict_size)
            folder.report_refused()
            self.datasets["predict"] = folder
        return DataLoader(
            self.datasets["predict"],
            batch_size=self.eval_batch_size if self.predict_size is not None else 1,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    @rank_zero_only
    def teardown(self, stage: str) -> None:
        """After ``predict`` on ``predict_dir``, print which files were processed, converted and refused."""
        from polytask.data.predict import ImageFolder

        folder = self.datasets.get("predict")
        if stage == "predict" and isinstance(folder, ImageFolder):
            print(folder.summary(), file=sys.stderr)
