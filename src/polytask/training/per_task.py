"""Per-task training: one forward, backward and optimizer step per task per batch.

This is the protocol of Task Routing and Maximum Roaming, which the known ETR-NLP
re-implementations follow: for every batch and every task ``t`` in order, the network runs
the path of ``t`` only (``net.forward_task`` when the network has a per-task mode, otherwise
the full forward), the weighted loss of ``t`` is back-propagated and the optimizer steps.
Shared parameters are therefore updated ``T`` times per batch; the parameters of other tasks
get no gradient (``None``) and are skipped by the optimizer. The non-finite guard of
:class:`MultiTaskModule` judges every per-task step on its own.
"""

from __future__ import annotations

from typing import Any

import torch

from polytask.training.module import MultiTaskModule


class PerTaskModule(MultiTaskModule):
    """:class:`MultiTaskModule` trained with manual optimisation, one optimizer step per task.

    Evaluation is unchanged (all tasks in one forward). The learning-rate schedule steps once
    per batch, so its length is the number of batches (``trainer.estimated_stepping_batches``);
    ``trainer.global_step`` counts optimizer steps, ``T`` per batch. Lightning's
    ``Trainer(gradient_clip_val=...)`` is not available under manual optimisation (set it to
    ``null``); use ``gradient_clip_val`` here instead.

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
        forward_task = getattr(self.net, "forward_task", None)
        if forward_task is not None:
            return forward_task(images, name)
        return self.net(images)[name]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        images = batch["image"]
        task_losses: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(self.task_output(images, task.name), batch[task.name])
            weighted = self.loss_weights[task.name] * loss
            self.guard.observe_losses({task.name: loss}, weighted)
            self.manual_backward(weighted)
            if self.gradient_clip_val is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            optimizer.step()
            task_losses[task.name] = loss.detach()
        self.lr_schedulers().step()
        batch_size = images.shape[0]
        self.log_dict({f"train/loss/{n}": v for n, v in task_losses.items()}, batch_size=batch_size)
        self.log("train/loss", self.weighted_total(task_losses), prog_bar=True, batch_size=batch_size)
