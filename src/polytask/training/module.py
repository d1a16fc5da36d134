"""The Lightning module that trains and evaluates any multi-task network."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from polytask.metrics import delta_m, load_reference
from polytask.models.base import MultiTaskNet
from polytask.tasks import Task
from polytask.training.schedulers import ScheduleName, build_scheduler

NetFactory = Callable[[Sequence[Task]], MultiTaskNet]


class MultiTaskModule(pl.LightningModule):
    """Weighted sum of task losses, per-task logging, split-level metrics and Delta_m.

    Args:
        net: builds the network from the task list (in a config: ``class_path`` of a
            :class:`~polytask.models.MultiTaskNet` and its ``init_args`` without ``tasks``).
        tasks: the tasks, linked from the datamodule by the CLI.
        default_loss_weights: the dataset's default loss weights, linked from the datamodule.
        loss_weights: overrides of the loss weights by task name.
        optimizer: optimizer factory over the trainable parameters.
        lr_schedule: per-iteration schedule: ``poly`` (power ``poly_power``), ``cosine`` or ``constant``.
        poly_power: exponent of the poly schedule.
        warmup_steps: linear warm-up steps.
        single_task_reference: JSON file ``{task: {metric: value}}`` of single-task results; when
            given, Delta_m is computed after every validation and test.
    """

    def __init__(
        self,
        net: NetFactory,
        tasks: Sequence[Task],
        default_loss_weights: Mapping[str, float] | None = None,
        loss_weights: Mapping[str, float] | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_schedule: ScheduleName = "poly",
        poly_power: float = 0.9,
        warmup_steps: int = 0,
        single_task_reference: str | None = None,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        names = [t.name for t in self.tasks]
        for source, weights in (("loss_weights", loss_weights), ("default_loss_weights", default_loss_weights)):
            unknown = sorted(set(weights or {}) - set(names))
            if unknown:
                raise ValueError(f"{source} names task(s) {unknown} that are not trained; tasks: {names}")
        self.loss_weights = {n: float({**(default_loss_weights or {}), **(loss_weights or {})}.get(n, 1.0)) for n in names}
        self.net = net(self.tasks)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.poly_power = poly_power
        self.warmup_steps = warmup_steps
        self.reference = load_reference(single_task_reference) if single_task_reference else None
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({t.name: t.make_metric() for t in self.tasks}) for stage in ("val", "test")}
        )
        self.results: dict[str, dict[str, dict[str, float]]] = {}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> raw outputs per task."""
        return self.net(images)

    def compute_losses(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Unweighted loss of every task."""
        return {t.name: t.loss(outputs[t.name], batch[t.name]) for t in self.tasks}

    def weighted_total(self, task_losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of ``loss_weights[t] * loss_t``."""
        return sum(self.loss_weights[n] * loss for n, loss in task_losses.items())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        outputs = self(batch["image"])
        task_losses = self.compute_losses(outputs, batch)
        total = self.weighted_total(task_losses)
        batch_size = batch["image"].shape[0]
        self.log_dict({f"train/loss/{n}": v.detach() for n, v in task_losses.items()}, batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        return total

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        outputs = self(batch["image"])
        task_losses = self.compute_losses(outputs, batch)
        batch_size = batch["image"].shape[0]
        self.log(f"{stage}/loss", self.weighted_total(task_losses), batch_size=batch_size, sync_dist=True)
        for task in self.tasks:
            self.metrics[stage][task.name].update(task.postprocess(outputs[task.name]), batch[task.name])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Post-processed predictions of every task plus the batch's ``meta``."""
        outputs = self(batch["image"])
        preds: dict[str, Any] = {t.name: t.postprocess(outputs[t.name]) for t in self.tasks}
        preds["meta"] = batch.get("meta", {})
        return preds

    def _eval_epoch_end(self, stage: str) -> None:
        results: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            metric = self.metrics[stage][task.name]
            values = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
            results[task.name] = values
            self.log_dict({f"{stage}/{task.name}/{k}": v for k, v in values.items()}, sync_dist=False)
        if self.reference is not None:
            directions = {t.name: t.higher_is_better for t in self.tasks}
            dm = delta_m(results, self.reference, directions)
            results["multi_task"] = {"delta_m": dm}
            self.log(f"{stage}/delta_m", dm)
        self.results[stage] = results

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, total, self.lr_schedule, self.poly_power, self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
