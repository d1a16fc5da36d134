"""The Lightning module that trains and evaluates any multi-task network."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torchmetrics import Metric

from polytask.metrics import MetricProtocol, check_protocol, delta_m, load_reference, protocol_setting
from polytask.models.base import MultiTaskNet
from polytask.tasks import Task
from polytask.training.checkpoint import (
    CHECKPOINT_KEY,
    checkpoint_config,
    describe_net,
    mismatch_error,
    restore_rng_state,
    rng_state,
    state_dict_mismatch,
)
from polytask.training.guard import NonFiniteGuard
from polytask.training.schedulers import ScheduleName, build_scheduler
from polytask.weighting import FixedWeighting, Weighting

NetFactory = Callable[[Sequence[Task]], MultiTaskNet]


class MultiTaskModule(pl.LightningModule):
    """Weighted sum of task losses, per-task logging, split-level metrics and Delta_m.

    Args:
        net: builds the network from the task list (in a config: ``class_path`` of a
            :class:`~polytask.models.MultiTaskNet` and its ``init_args`` without ``tasks``).
        tasks: the tasks, linked from the datamodule by the CLI (never modified: a task whose
            metric options differ, e.g. saliency with ``legacy_sigmoid``, is replaced by a new one).
        default_loss_weights: the dataset's default loss weights, linked from the datamodule.
        loss_weights: overrides of the loss weights by task name.
        optimizer: optimizer factory over the trainable parameters.
        lr_schedule: per-iteration schedule: ``poly`` (power ``poly_power``), ``cosine`` or ``constant``.
        poly_power: exponent of the poly schedule.
        warmup_steps: linear warm-up steps.
        single_task_reference: JSON file ``{task: {metric: value}}`` of single-task results; when
            given, Delta_m is computed after every validation and test.
        max_nonfinite_steps: consecutive optimizer steps with a NaN/inf loss or gradient (each is
            skipped: no update) after which training stops with an error naming the tasks.
        legacy_sigmoid: score saliency maxF with the InvPT-family quirk (a sigmoid applied to the
            probabilities); off by default, and every metric table says which was used.
        metric_protocol: ``split_level`` (default) or ``maximum_roaming``: score validation and
            test as Maximum Roaming's scripts print them (per-batch averages: their numbers depend
            on ``data.eval_batch_size``; see docs/evaluation.md). Every metric table says which.
        weighting: how the task losses of a training step become the total
            (:mod:`polytask.weighting`; in a config a ``class_path`` and its ``init_args``); None:
            :class:`~polytask.weighting.FixedWeighting`, the fixed loss weights above. Validation
            and test losses always use the fixed weights (:meth:`weighted_total`).
        task_backward: ``auto`` (default): when the network runs its task paths one after another
            for a training batch (:meth:`~polytask.models.MultiTaskNet.runs_tasks_apart`: ETR-NLP and
            the routed baselines with ``task_batching`` looping), back-propagate each task's loss
            right after its path's forward, so that one path's activations are held at a time; the
            gradients are those of the joint backward (summed in another order). It needs weights
            known before the losses (fixed, equal, uncertainty, DWA, RLW), one process, no gradient
            accumulation, no float16 loss scaling and no task-interference callback; otherwise, and
            with ``joint``, one backward pass of the total.

    Checkpoints carry, besides Lightning's state, ``checkpoint["polytask"]``: the model config
    (:attr:`config_json`), the global random generators and the non-finite guard's counters.
    Loading a checkpoint whose tensors do not fit the model raises
    :class:`~polytask.training.checkpoint.CheckpointMismatchError`.
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
        max_nonfinite_steps: int = 10,
        legacy_sigmoid: bool = False,
        metric_protocol: MetricProtocol = "split_level",
        weighting: Weighting | None = None,
        task_backward: Literal["auto", "joint"] = "auto",
    ) -> None:
        super().__init__()
        if task_backward not in ("auto", "joint"):
            raise ValueError(f"task_backward must be 'auto' or 'joint', got {task_backward!r}")
        self.task_backward = task_backward
        self.keep_task_graphs = False
        """Set by callbacks that read :attr:`step_task_losses` with their graphs before the backward
        pass (:class:`~polytask.diagnostics.TaskInterference`): training steps then use one joint backward."""
        self._gradients_ready = False
        self.tasks = [task.with_metric_options(legacy_sigmoid=legacy_sigmoid) for task in tasks]
        names = [t.name for t in self.tasks]
        for source, weights in (("loss_weights", loss_weights), ("default_loss_weights", default_loss_weights)):
            unknown = sorted(set(weights or {}) - set(names))
            if unknown:
                raise ValueError(f"{source} names task(s) {unknown} that are not trained; tasks: {names}")
        self.loss_weights = {n: float({**(default_loss_weights or {}), **(loss_weights or {})}.get(n, 1.0)) for n in names}
        self.net = net(self.tasks)
        self.weighting = weighting if weighting is not None else FixedWeighting()
        self.weighting.setup(names, self.loss_weights)
        self.weighting.attach(self.net)
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.poly_power = poly_power
        self.warmup_steps = warmup_steps
        self.reference = load_reference(single_task_reference) if single_task_reference else None
        self.metric_protocol = check_protocol(metric_protocol)
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({t.name: t.make_metric(self.metric_protocol) for t in self.tasks}) for stage in ("val", "test")}
        )
        self.results: dict[str, dict[str, dict[str, float]]] = {}
        self.loaded_position: tuple[int, int] | None = None
        """``(epoch, global step)`` recorded in the last checkpoint loaded, None when none was."""
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.step_task_losses: dict[str, torch.Tensor] = {}
        """The unweighted task losses of the training step in progress, with their graphs (read by
        :class:`~polytask.diagnostics.TaskInterference` before the backward pass)."""
        self.config_json = self._describe(net)

    def evaluation_settings(self) -> dict[str, str]:
        """Metric settings that change the numbers, for the printed table and the JSON file."""
        settings: dict[str, str] = {"metrics": protocol_setting(self.metric_protocol)}
        for task in self.tasks:
            settings.update(task.metric_settings())
        return settings

    def _describe(self, net: NetFactory) -> str:
        """JSON description of the model (network class and options, tasks, loss weights) for checkpoints."""
        net_config = describe_net(self.net)
        if isinstance(net, functools.partial):
            net_config["init_args"] = net.keywords
        module = f"{type(self).__module__}.{type(self).__qualname__}"
        config = {"module": module, "net": net_config, "loss_weights": self.loss_weights}
        return json.dumps(config, sort_keys=True, default=repr)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> raw outputs per task."""
        return self.net(images)

    def compute_losses(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Unweighted loss of every task."""
        return {t.name: t.loss(outputs[t.name], batch[t.name]) for t in self.tasks}

    def weighted_total(self, task_losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of ``loss_weights[t] * loss_t`` (the fixed weights, whatever :attr:`weighting` is)."""
        return sum(self.loss_weights[n] * loss for n, loss in task_losses.items())

    def _reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged over the processes of the run (itself outside a trainer)."""
        if self._trainer is None:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="mean")

    def training_total(self, task_losses: Mapping[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """The total loss of a training step by :attr:`weighting`; updates its state and logs
        ``train/weight/<task>``."""
        self.weighting.set_epoch(self.current_epoch)
        total = self.weighting(task_losses, self._reduce_mean)
        self.weighting.update({n: v.detach() for n, v in task_losses.items()}, self._reduce_mean)
        self.log_dict({f"train/weight/{n}": w for n, w in self.weighting.last_weights.items()}, batch_size=batch_size)
        return total

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Back-propagate the total, or let a strategy that owns the backward pass fill the gradients
        (gradient aggregation); nothing when the training step back-propagated task by task."""
        if self._gradients_ready:
            self._gradients_ready = False
            return
        if self.weighting.owns_backward:
            world_size = self.trainer.world_size if self._trainer is not None else 1
            self.weighting.backward(loss, self.step_task_losses, self._reduce_mean, world_size)
        else:
            super().backward(loss, *args, **kwargs)

    def on_fit_start(self) -> None:
        """Refuse a weighting strategy that per-task optimisation cannot serve, and a
        gradient-aggregating one under float16 loss scaling; under DDP, hand the averaging of the
        gradients to a strategy that computes them itself."""
        if self.weighting.owns_backward and self.automatic_optimization:
            if self.trainer.world_size > 1:
                self._leave_gradient_averaging_to_weighting()
            if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
                raise ValueError(
                    f"weighting {type(self.weighting).__name__} does not work with float16 loss scaling "
                    f"(precision {self.trainer.precision}); use bf16-mixed or 32"
                )
        if not self.automatic_optimization and not self.weighting.per_task_steps:
            raise ValueError(
                f"{type(self).__name__} trains one task per optimizer step, and weighting {type(self.weighting).__name__} "
                "needs every task's loss (or gradient) of the same step at once; use FixedWeighting, EqualWeighting, "
                "UncertaintyWeighting, DynamicWeightAverage or RandomLossWeighting"
            )

    def _leave_gradient_averaging_to_weighting(self) -> None:
        """Turn DDP's gradient averaging off (its hooks would average partial gradients, or none):
        the strategy averages what it computes over the processes itself."""
        wrapper = self.trainer.strategy.model
        if not isinstance(wrapper, DistributedDataParallel):
            raise ValueError(
                f"weighting {type(self.weighting).__name__} computes the gradients itself and averages them over "
                f"DDP's processes; strategy {type(self.trainer.strategy).__name__} is not DDP"
            )
        wrapper.require_backward_grad_sync = False  # DDP then neither prepares nor runs its reduction

    def on_train_start(self) -> None:
        """Start the non-finite guard afresh (no buffer copy from an earlier run)."""
        self.guard.start()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Let the guard copy the buffers a skipped step must restore."""
        self.guard.snapshot(self)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Optimizer) -> None:
        """Lightning's zeroing (after the training step, before its backward), except when the step
        already filled the gradients task by task."""
        if not self._gradients_ready:
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def backward_by_task(self, images: torch.Tensor) -> bool:
        """Whether the training step on ``images`` back-propagates task by task (see ``task_backward``)."""
        if self.task_backward != "auto" or not self.automatic_optimization or self.keep_task_graphs:
            return False
        runs_apart = getattr(self.net, "runs_tasks_apart", None)  # (the bench's bare network has no task paths)
        if self.weighting.owns_backward or not self.weighting.per_task_steps or runs_apart is None or not runs_apart(images):
            return False
        if self._trainer is None:
            return True
        trainer = self.trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return trainer.world_size == 1 and trainer.accumulate_grad_batches == 1 and scaler is None

    def _training_step_by_task(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward, loss and backward of one task after another; returns the detached total."""
        images = batch["image"]
        for p in self.parameters():
            p.grad = None
        self.weighting.set_epoch(self.current_epoch)
        weights = self.weighting.per_task_weights()
        task_losses: dict[str, torch.Tensor] = {}
        terms = []
        for task in self.tasks:
            loss = task.loss(self.net.forward_task(images, task.name), batch[task.name])
            term = self.weighting.task_term(task.name, loss, weights)
            term.backward()
            task_losses[task.name] = loss.detach()
            terms.append(term.detach())
        total = torch.stack(terms).sum()
        self.weighting.update(task_losses, self._reduce_mean)
        self.step_task_losses = {}
        self._gradients_ready = True
        batch_size = images.shape[0]
        self.guard.observe_losses(task_losses, total)
        self.log_dict({f"train/weight/{n}": w for n, w in self.weighting.last_weights.items()}, batch_size=batch_size)
        self.log_training_losses(task_losses, total, batch_size)
        return total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.backward_by_task(batch["image"]):
            return self._training_step_by_task(batch)
        outputs = self(batch["image"])
        task_losses = self.compute_losses(outputs, batch)
        self.step_task_losses = task_losses
        batch_size = batch["image"].shape[0]
        total = self.training_total(task_losses, batch_size)
        aux = self.net.aux_loss()
        if aux is not None:  # e.g. TaskExpert's load-balancing loss (already weighted)
            total = total + aux
            self.log("train/loss/aux", aux.detach(), batch_size=batch_size)
        self.guard.observe_losses(task_losses, total)
        self.log_training_losses(task_losses, total, batch_size)
        return total

    def log_training_losses(self, task_losses: Mapping[str, torch.Tensor], total: torch.Tensor, batch_size: int) -> None:
        """Log ``train/loss/<task>`` and ``train/loss`` (the total, on the progress bar) of a training step."""
        self.log_dict({f"train/loss/{n}": v.detach() for n, v in task_losses.items()}, batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """Skip the step (drop gradients, restore buffers) when the loss or a gradient is NaN/inf."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        skipped = self.guard.check(self, self.global_step, check_gradients=scaler is None)
        if skipped is not None:
            rank_zero_warn(
                f"step {self.global_step}: {skipped}; optimizer step skipped "
                f"({self.guard.consecutive} in a row, limit max_nonfinite_steps={self.guard.max_consecutive})"
            )
        self.log("train/nonfinite_steps", float(self.guard.total), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add ``checkpoint["polytask"]``: model config (JSON), global generators, guard counters."""
        checkpoint[CHECKPOINT_KEY] = {"config": self.config_json, "rng": rng_state(), "guard": self.guard.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint fits this model; when fitting, restore the generators and guard."""
        found = checkpoint.get("state_dict", {})
        problems = state_dict_mismatch(self.state_dict(), found, shapes_only=not self.strict_loading)
        if problems:
            source = str(self._trainer.ckpt_path) if self._trainer is not None and self._trainer.ckpt_path else "checkpoint"
            raise mismatch_error(source, problems, checkpoint_config(checkpoint), self.config_json)
        self.loaded_position = (int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))
        entry = checkpoint.get(CHECKPOINT_KEY, {})
        if "guard" in entry:
            self.guard.load_state_dict(entry["guard"])
        if "rng" in entry and self._trainer is not None and self._trainer.state.fn == "fit":
            restore_rng_state(entry["rng"])

    def _eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        outputs = self(batch["image"])
        task_losses = self.compute_losses(outputs, batch)
        batch_size = batch["image"].shape[0]
        self.log(f"{stage}/loss", self.weighted_total(task_losses), batch_size=batch_size, sync_dist=True)
        preds: dict[str, Any] = {t.name: t.postprocess(outputs[t.name]) for t in self.tasks}
        for task in self.tasks:
            self.metrics[stage][task.name].update(preds[task.name], batch[task.name])
        preds["meta"] = batch.get("meta", {})
        return preds

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Update the validation metrics; returns the predictions as :meth:`predict_step` does."""
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Update the test metrics; returns the predictions (callbacks may save them to files)."""
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Post-processed predictions of every task plus the batch's ``meta``."""
        outputs = self(batch["image"])
        preds: dict[str, Any] = {t.name: t.postprocess(outputs[t.name]) for t in self.tasks}
        preds["meta"] = batch.get("meta", {})
        return preds

    def _eval_epoch_end(self, stage: str) -> None:
        results: dict[str, dict[str, float]] = {}
        metrics = self.metrics[stage]
        for task in self.tasks:
            values = {k: float(v) for k, v in metrics[task.name].compute().items()}
            results[task.name] = values
            self.log_dict({f"{stage}/{task.name}/{k}": v for k, v in values.items()}, sync_dist=False)
        for key, values in self._joint_results(stage).items():
            if key not in results:
                results[key] = values
                self.log_dict({f"{stage}/{key}/{k}": v for k, v in values.items()}, sync_dist=False)
        for task in self.tasks:
            metrics[task.name].reset()
        if self.reference is not None:
            directions = {t.name: t.higher_is_better for t in self.tasks}
            dm = delta_m(results, self.reference, directions)
            results["multi_task"] = {"delta_m": dm}
            self.log(f"{stage}/delta_m", dm)
        self.results[stage] = results

    def _joint_results(self, stage: str) -> dict[str, dict[str, float]]:
        """:meth:`Task.joint_results` of every task class over its tasks' ``stage`` metrics (e.g.
        CelebA's means over all attributes of all groups); a task's own results are never replaced."""
        by_class: dict[type[Task], list[Metric]] = {}
        for task in self.tasks:
            by_class.setdefault(type(task), []).append(self.metrics[stage][task.name])
        joint: dict[str, dict[str, float]] = {}
        for task_class, metrics in by_class.items():
            joint.update(task_class.joint_results(metrics))
        return joint

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, total, self.lr_schedule, self.poly_power, self.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
