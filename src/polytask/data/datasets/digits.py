"""Digit pairs: a small image-level multi-task problem built from scikit-learn's 8x8 digits (no download).

Every image shows two handwritten digits side by side, each upsampled (bilinear) from 8x8
to ``8 s x 8 s`` pixels, so an image is ``(3, 8 s, 16 s)`` (grey replicated to RGB,
normalised with the ImageNet mean and std). Four image-level classification tasks read it:

=========== ======= ===========================================================
task        classes label
=========== ======= ===========================================================
``left``    10      the left digit
``right``   10      the right digit
``parity``  2       ``(left + right) mod 2``
``compare`` 3       0 if left < right, 1 if equal, 2 if left > right
=========== ======= ===========================================================

The 1797 source digits are split once, by a permutation drawn from ``seed``, into disjoint
pools (60 % train, 20 % val, 20 % test), so test images never appear in training; the
pairs of a split are drawn with replacement from its pool, deterministically from
``(seed, split)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from polytask.constants import IMAGENET_MEAN, IMAGENET_STD
from polytask.data.datamodule import MultiTaskDataModule
from polytask.tasks import ImageClassificationTask, Task

TASK_CLASSES: dict[str, int] = {"left": 10, "right": 10, "parity": 2, "compare": 3}
SPLIT_FRACTIONS: dict[str, tuple[float, float]] = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}


def pair_labels(left: np.ndarray, right: np.ndarray) -> dict[str, np.ndarray]:
    """Labels of every task for digit pairs ``(left, right)``, each ``(N,)`` int64."""
    return {
        "left": left,
        "right": right,
        "parity": (left + right) % 2,
        "compare": np.sign(left - right) + 1,
    }


def split_pool(num_digits: int, split: str, seed: int) -> np.ndarray:
    """Indices of the source digits of ``split`` (disjoint pools of one seeded permutation)."""
    order = np.random.default_rng(seed).permutation(num_digits)
    lo, hi = SPLIT_FRACTIONS[split]
    return np.sort(order[round(lo * num_digits) : round(hi * num_digits)])


class DigitPairs(Dataset):
    """One split of digit pairs; samples follow the sample contract (task targets are 0-dim int64).

    Args:
        split: ``train``, ``val`` or ``test``.
        num_samples: pairs in the split.
        scale: upsampling factor ``s`` of each 8x8 digit (images are ``8 s x 16 s``).
        seed: seed of the pools and of the pairs.
        tasks: names of the tasks to return.
    """

    def __init__(
        self, split: str, num_samples: int, scale: int = 4, seed: int = 0, tasks: Sequence[str] = tuple(TASK_CLASSES)
    ) -> None:
        if split not in SPLIT_FRACTIONS:
            raise ValueError(f"digits split must be one of {tuple(SPLIT_FRACTIONS)}, got {split!r}")
        unknown = sorted(set(tasks) - set(TASK_CLASSES))
        if unknown:
            raise ValueError(f"digit pairs carry no task(s) {unknown}; tasks: {list(TASK_CLASSES)}")
        digits = load_digits()
        pool = split_pool(len(digits.target), split, seed)
        rng = np.random.default_rng([seed, list(SPLIT_FRACTIONS).index(split)])
        self.left_index = rng.choice(pool, num_samples)
        self.right_index = rng.choice(pool, num_samples)
        self.split = split
        self.tasks = list(tasks)
        labels = pair_labels(digits.target[self.left_index].astype(np.int64), digits.target[self.right_index].astype(np.int64))
        self.labels = {name: torch.from_numpy(labels[name]) for name in self.tasks}
        source = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
        self.digits = F.interpolate(source, scale_factor=scale, mode="bilinear", align_corners=False).clamp(0.0, 1.0)[:, 0]
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.left_index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        grey = torch.cat([self.digits[self.left_index[index]], self.digits[self.right_index[index]]], dim=1)
        image = (grey.expand(3, -1, -1) - self.mean) / self.std
        sample: dict[str, Any] = {"image": image}
        sample.update({name: self.labels[name][index] for name in self.tasks})
        sample["meta"] = {"id": f"{self.split}_{index:06d}", "size": tuple(grey.shape)}
        return sample


class DigitsDataModule(MultiTaskDataModule):
    """Digit pairs (see the module docstring): four image-level classification tasks, every loss weight 1.

    Args:
        tasks: subset of left, right, parity, compare (default: all).
        num_train: training pairs.
        num_val: pairs of the validation split and of the test split (``predict`` uses the test split).
        scale: upsampling factor of each digit (4: images of 32x64).
        seed: seed of the pools and pairs.
        batch_size: images per training batch.
        kwargs: further options of :class:`~polytask.data.datamodule.MultiTaskDataModule` (``eval_batch_size``,
            ``num_workers``, ``predict_dir``, ``predict_size``).
    """

    name = "digits"

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        num_train: int = 4000,
        num_val: int = 1000,
        scale: int = 4,
        seed: int = 0,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        self.num_train = num_train
        self.num_val = num_val
        self.scale = scale
        self.seed = seed
        super().__init__(tasks=tasks, batch_size=batch_size, **kwargs)

    def available_tasks(self) -> list[Task]:
        return [ImageClassificationTask(name, classes) for name, classes in TASK_CLASSES.items()]

    def default_loss_weights(self) -> Mapping[str, float]:
        return {name: 1.0 for name in TASK_CLASSES}

    def make_dataset(self, split: str) -> Dataset:
        split = "test" if split == "predict" else split
        return DigitPairs(split, self.num_train if split == "train" else self.num_val, self.scale, self.seed, self.task_names)
