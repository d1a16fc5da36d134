"""Throughput of a datamodule's training loader, for ``polytask bench``.

The loader is the one training uses (``datamodule.train_dataloader()``: the config's batch size,
``num_workers``, shuffling, augmentation and ``pin_memory`` on CUDA machines). Datasets with a
``prepare()`` method (SynthScenes renders and caches its split there; wrappers such as the
training loader's ``SeededSamples`` are looked through via their ``dataset`` attribute) are prepared first, so the
measurement sees the cached steady state, not the one-off rendering or decoding.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset

from polytask.data.datamodule import MultiTaskDataModule


@dataclass
class LoaderStats:
    """Samples per second of a training loader.

    Attributes:
        batches: batches timed (after the first one).
        batch_size: images per batch.
        num_workers: the loader's worker processes.
        pin_memory: whether batches are copied to pinned memory.
        first_batch_s: seconds to the first batch (worker start-up and shuffling included).
        seconds: seconds for the timed batches.
        samples_per_s: images per second over the timed batches.
    """

    batches: int
    batch_size: int
    num_workers: int
    pin_memory: bool
    first_batch_s: float
    seconds: float
    samples_per_s: float

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON."""
        return asdict(self)


def _batches(loader: DataLoader) -> Iterator[Any]:
    """Batches of ``loader`` without end: a new epoch starts when one is exhausted."""
    while True:
        yield from loader


def _batch_len(batch: Any) -> int:
    """Images in a collated batch (the ``image`` tensor's leading axis)."""
    return int(batch["image"].shape[0])


def _stop_workers(loader: DataLoader) -> None:
    """End the worker processes a loader with ``persistent_workers`` keeps for its next epoch.

    Left to the garbage collector, they are shut down after their queues are gone: 5 s of waiting
    per worker, at whatever moment the collector runs (as Lightning does after each loop, the
    loader's private iterator is shut down here).
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    loader._iterator = None


def measure_loader(datamodule: MultiTaskDataModule, batches: int) -> tuple[LoaderStats, dict[str, Any]]:
    """Iterate the training loader for ``1 + batches`` batches and time the last ``batches``.

    Args:
        datamodule: an instantiated datamodule (its dataset files must exist).
        batches: batches to time after the first (warm-up) batch.

    Returns:
        The throughput and the first batch (a collated dict of the sample contract).

    Raises:
        Exception: whatever the dataset raises when its files are absent or broken.
    """
    loader = datamodule.train_dataloader()
    dataset = loader.dataset
    while not hasattr(dataset, "prepare") and isinstance(getattr(dataset, "dataset", None), Dataset):
        dataset = dataset.dataset
    prepare = getattr(dataset, "prepare", None)
    if callable(prepare):
        prepare()
    stream = _batches(loader)
    try:
        start = time.perf_counter()
        first_batch = next(stream)
        first = time.perf_counter() - start
        samples = 0
        start = time.perf_counter()
        for _ in range(batches):
            samples += _batch_len(next(stream))
        seconds = time.perf_counter() - start
    finally:
        stream.close()
        _stop_workers(loader)
    stats = LoaderStats(
        batches=batches,
        batch_size=int(loader.batch_size or 0),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        first_batch_s=first,
        seconds=seconds,
        samples_per_s=samples / seconds if seconds > 0 else float("inf"),
    )
    return stats, first_batch
