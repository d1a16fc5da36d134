"""Per-task training: one forward, backward and optimizer step per task per batch.

This is the protocol of Task Routing and Maximum Roaming, which the known ETR-NLP
re-implementations follow: for every batch and every task ``t`` in order, the network runs
the path of ``t`` only (``net.forward_task`` when the network has a per-task mode, otherwise
the full forward), the weighted loss of ``t`` is back-propagated and the optimizer steps.
Shared parameters are therefore updated ``T`` times per batch; the parameters of other tasks
get no gradient (``None``) and are skipped by the optimizer. The non-finite guard of
:class:`MultiTaskModule` judges every per-task step on its own.

Under DDP each per-task backward runs without DDP's reducer (which expects a gradient for every
parameter in every backward, and would fail on the other tasks' branches), and
:func:`all_reduce_gradients` then averages the gradients that exist over the processes: every
process trains the same task at the same step, so the set of parameters with a gradient is the
same everywhere, which is checked (a mismatch raises on every process instead of hanging or
silently mixing tasks). The result is the gradient of one process holding the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polytask.training.module import MultiTaskModule


class GradientMismatchError(RuntimeError):
    """The processes of a distributed run hold gradients for different parameters."""


def _by_dtype(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[torch.Tensor]]:
    """``tensors`` grouped by dtype, each group in the order given."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return groups


def all_reduce_gradients(parameters: Sequence[nn.Parameter], step: str) -> None:
    """Average over the processes the gradients of those ``parameters`` that have one.

    Every process must call it with the same parameters in the same order. First one small
    all-reduce compares, over the processes, which parameters hold a gradient (their number,
    the sum of their positions, the sum of their sizes); when they differ every process raises
    :class:`GradientMismatchError`. Then the gradients, flattened into one tensor per dtype in
    the order of ``parameters``, are summed and divided by the number of processes.

    Args:
        parameters: the trainable parameters of the module, in a fixed order.
        step: what is being stepped, for the error message (e.g. ``"task semseg"``).
    """
    positions = [i for i, p in enumerate(parameters) if p.grad is not None]
    grads = [parameters[i].grad for i in positions]
    device = parameters[0].device
    signature = torch.tensor([len(positions), sum(positions), sum(g.numel() for g in grads)], device=device)
    extremes = torch.cat([signature, -signature])  # max and -min in one all-reduce
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if not torch.equal(extremes[:3], -extremes[3:]):
        low, high = (-extremes[3:]).tolist(), extremes[:3].tolist()
        raise GradientMismatchError(
            f"{step}: the processes hold gradients for different parameters "
            f"(count, position sum, size sum: from {low} to {high}); every process must train the same "
            "task at the same step and reach the same parameters"
        )
    world_size = dist.get_world_size()
    for group in _by_dtype(grads).values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        flat /= world_size
        for grad, value in zip(group, flat.split([g.numel() for g in group])):
            grad.copy_(value.view_as(grad))


def broadcast_buffers(module: nn.Module) -> None:
    """Copy global rank 0's buffers (e.g. BatchNorm running statistics) to every process, as DDP
    does before every forward with ``broadcast_buffers=True`` (its default)."""
    with torch.no_grad():
        for group in _by_dtype(list(module.buffers())).values():
            flat = torch.cat([b.reshape(-1) for b in group])
            dist.broadcast(flat, src=0)
            for buffer, value in zip(group, flat.split([b.numel() for b in group])):
                buffer.copy_(value.view_as(buffer))


class PerTaskModule(MultiTaskModule):
    """:class:`MultiTaskModule` trained with manual optimisation, one optimizer step per task.

    Evaluation is unchanged (all tasks in one forward). The learning-rate schedule steps once
    per batch, so its length is the number of batches (``trainer.estimated_stepping_batches``);
    ``trainer.global_step`` counts optimizer steps, ``T`` per batch. Lightning's
    ``Trainer(gradient_clip_val=...)`` is not available under manual optimisation (set it to
    ``null``); use ``gradient_clip_val`` here instead.

    Multi-process training needs a DDP strategy (``ddp``, ``ddp_spawn``...; plain ``ddp`` is
    enough: no ``find_unused_parameters``). Each per-task gradient is averaged over the processes
    by :func:`all_reduce_gradients`, and rank 0's buffers are copied to every process before each
    batch (:func:`broadcast_buffers`), as DDP does in batched training.

    Args:
        gradient_clip_val: clip the gradient norm of every per-task step to this value (None: no clipping).
        kwargs: the arguments of :class:`MultiTaskModule`.
    """

    def __init__(self, gradient_clip_val: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.gradient_clip_val = gradient_clip_val

    def task_output(self, images: torch.Tensor, name: str) -> torch.Tensor:
        """Raw output of task ``name`` from the per-task path of the network: ``(B, 3, H, W)`` -> its output."""
        return self.net.forward_task(images, name)

    def _ddp(self) -> DistributedDataParallel | None:
        """The DDP wrapper of this module in a multi-process run, None in a single process.

        Raises:
            RuntimeError: a multi-process strategy that does not wrap the module in DDP.
        """
        wrapper = self.trainer.strategy.model
        if isinstance(wrapper, DistributedDataParallel):
            return wrapper
        if self.trainer.world_size > 1:
            raise RuntimeError(
                f"PerTaskModule trains on several processes with a DDP strategy only, not {type(self.trainer.strategy).__name__}"
            )
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        images = batch["image"]
        ddp = self._ddp()
        if ddp is not None and ddp.broadcast_buffers:
            broadcast_buffers(self)
        parameters = [p for p in self.parameters() if p.requires_grad]
        task_losses: dict[str, torch.Tensor] = {}
        self.weighting.set_epoch(self.current_epoch)
        weights = self.weighting.per_task_weights()
        for task in self.tasks:
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(self.task_output(images, task.name), batch[task.name])
            weighted = self.weighting.task_term(task.name, loss, weights)
            self.guard.observe_losses({task.name: loss}, weighted)
            with ddp.no_sync() if ddp is not None else nullcontext():  # gradients averaged below, not by DDP
                self.manual_backward(weighted)
            if ddp is not None:
                all_reduce_gradients(parameters, f"per-task step of task {task.name!r}")
            if self.gradient_clip_val is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            optimizer.step()
            task_losses[task.name] = loss.detach()
        self.lr_schedulers().step()
        self.weighting.update(task_losses, self._reduce_mean)
        batch_size = images.shape[0]
        self.log_dict({f"train/weight/{n}": w for n, w in weights.items()}, batch_size=batch_size)
        self.log_training_losses(task_losses, self.weighted_total(task_losses), batch_size)
