"""Metrics of the best constant predictor on the main job's SynthScenes validation split.

The constant of each task is fitted on the training split of the data module that
``polytask fit`` uses by default (``src/polytask/default.yaml``) and scored with the task's own
metric on the validation split, so it is the "chance" level the main job's table is compared with:

* ``semseg``, ``human_parts``: the most frequent training class at every pixel;
* ``depth``: the mean valid training depth (the RMSE-optimal constant);
* ``normals``: the mean training normal, normalised;
* ``sal``, ``edge``: the training fraction of positive pixels as a constant probability (any
  constant gives the same maxF / F_tol: every threshold marks all pixels or none).

Usage::

    python benchmarks/constant_baseline.py
    python benchmarks/constant_baseline.py --metrics runs/synthscenes_hard_sharing/version_0/val_metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from polytask.config import DEFAULT_CONFIG
from polytask.data import SynthScenesDataModule
from polytask.constants import IGNORE_INDEX
from polytask.tasks import DepthTask, NormalsTask, SegmentationTask, Task


def default_datamodule() -> SynthScenesDataModule:
    """The data module of ``polytask fit``'s defaults."""
    config = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())["data"]
    return SynthScenesDataModule(**config.get("init_args", {}))


class ConstantFit:
    """Training-split statistics of every task, accumulated over batches."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = list(tasks)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add one batch of targets (shapes as in docs/architecture.md)."""
        for task in self.tasks:
            target = batch[task.name]
            if isinstance(task, SegmentationTask):
                valid = target != IGNORE_INDEX
                total = torch.bincount(target[valid].flatten(), minlength=task.out_channels).double()
            elif isinstance(task, NormalsTask):
                valid = (target != IGNORE_INDEX).all(dim=1, keepdim=True) & (target.norm(dim=1, keepdim=True) > 0)
                total = (target * valid).sum(dim=(0, 2, 3)).double()
            else:
                valid = target != IGNORE_INDEX
                if isinstance(task, DepthTask):
                    valid &= target > 0
                total = target[valid].double().sum()
            self.sums[task.name] = self.sums.get(task.name, 0) + total
            self.counts[task.name] = self.counts.get(task.name, 0) + valid.sum().double()

    def prediction(self, task: Task, target: torch.Tensor) -> torch.Tensor:
        """The constant prediction of ``task`` in the shape its metric expects for ``target``."""
        mean = self.sums[task.name] / self.counts[task.name]
        if isinstance(task, SegmentationTask):
            return torch.full_like(target, int(mean.argmax()))
        if isinstance(task, NormalsTask):
            unit = (mean / mean.norm()).float().view(1, 3, 1, 1)
            return unit.expand_as(target).contiguous()
        return torch.full(target.shape, float(mean), dtype=torch.float32)


def constant_metrics(datamodule: SynthScenesDataModule, batch_size: int = 50) -> dict[str, dict[str, float]]:
    """Fit the constants on the training split and score them on the validation split."""
    datamodule.prepare_data()
    train = datamodule.make_dataset("train")
    train.transform = None
    fit = ConstantFit(datamodule.tasks)
    for batch in DataLoader(train, batch_size=batch_size):
        fit.update(batch)
    metrics = {task.name: task.make_metric() for task in datamodule.tasks}
    for batch in DataLoader(datamodule.make_dataset("val"), batch_size=batch_size):
        for task in datamodule.tasks:
            metrics[task.name].update(fit.prediction(task, batch[task.name]), batch[task.name])
    return {name: {k: float(v) for k, v in metric.compute().items()} for name, metric in metrics.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, help="a val_metrics.json of the main job to print beside the constants")
    options = parser.parse_args(argv)
    constants = constant_metrics(default_datamodule())
    model = json.loads(options.metrics.read_text())["results"] if options.metrics else {}
    print("| task | metric | constant predictor | main job |")
    print("|---|---|---|---|")
    for task, values in constants.items():
        for key, value in values.items():
            trained = model.get(task, {}).get(key)
            print(f"| {task} | {key} | {value:.2f} | {'-' if trained is None else f'{trained:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
