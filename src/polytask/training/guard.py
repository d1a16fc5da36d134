"""Non-finite guard: skip optimizer steps whose loss or gradients are NaN/inf; stop after too many in a row."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or non-finite gradients."""


class NonFiniteGuard:
    """Decides, before every optimizer step, whether the step may update the model.

    Call :meth:`snapshot` before the first forward pass, :meth:`observe_losses` with the per-task
    losses, and :meth:`check` after the backward pass (``on_before_optimizer_step``). A step with
    a non-finite loss or gradient is skipped: gradients are dropped (the optimizer updates
    nothing) and the module's buffers (e.g. BatchNorm statistics) are restored to their values
    before the step's forward passes (the copy taken by the previous check, or the snapshot).

    Args:
        max_consecutive: consecutive skipped steps after which :meth:`check` raises
            :class:`NonFiniteTrainingError`.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self._step_tasks: set[str] = set()
        self._step_total_bad = False
        self._streak_tasks: Counter[str] = Counter()
        self._buffers: dict[str, torch.Tensor] | None = None

    def start(self) -> None:
        """Forget the buffer copy and per-step records of an earlier run (call when training starts)."""
        self._buffers = None
        self._step_tasks, self._step_total_bad = set(), False

    def snapshot(self, module: nn.Module) -> None:
        """Copy the module's buffers unless a copy is held (:meth:`check` takes the next one itself)."""
        if self._buffers is None:
            self._buffers = _copy_buffers(module)

    def observe_losses(self, task_losses: Mapping[str, torch.Tensor], total: torch.Tensor) -> None:
        """Record which task losses (scalars) and whether the weighted ``total`` are non-finite."""
        names = list(task_losses)
        if names:
            finite = torch.stack([task_losses[n].detach().float() for n in names]).isfinite().tolist()
            self._step_tasks.update(n for n, ok in zip(names, finite) if not ok)
        self._step_total_bad |= not bool(torch.isfinite(total.detach()).all())

    def check(self, module: nn.Module, step: int, check_gradients: bool = True) -> str | None:
        """Decide on the coming optimizer step.

        Args:
            module: the trained module (its gradients are checked, and dropped on a skip).
            step: the global step, for the error message.
            check_gradients: also check gradients (off when an AMP grad scaler handles overflows).

        Returns:
            ``None`` when the step may proceed; else what was non-finite (the step is skipped and counted).

        Raises:
            NonFiniteTrainingError: ``max_consecutive`` steps in a row were skipped.
        """
        bad_tasks, total_bad = sorted(self._step_tasks), self._step_total_bad
        self._step_tasks, self._step_total_bad = set(), False
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        bad_grads = check_gradients and bool(grads) and not bool(
            torch.nn.utils.get_total_norm(grads, norm_type=float("inf")).isfinite()
        )
        buffers = self._buffers
        if not (bad_tasks or total_bad or bad_grads):
            self.consecutive = 0
            self._streak_tasks.clear()
            self._buffers = _copy_buffers(module)
            return None
        self.consecutive += 1
        self.total += 1
        self._streak_tasks.update(bad_tasks)
        for p in module.parameters():
            p.grad = None
        if buffers is not None:
            with torch.no_grad():
                for name, b in module.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
        self._buffers = _copy_buffers(module)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(self._stop_message(step))
        if bad_tasks:
            return f"non-finite loss of task(s) {bad_tasks}"
        return "non-finite total loss" if total_bad else "non-finite gradients"

    def _stop_message(self, step: int) -> str:
        if self._streak_tasks:
            counts = ", ".join(f"{n} ({c} of {self.consecutive} steps)" for n, c in self._streak_tasks.most_common())
            cause = f"the loss of task(s) {counts} was NaN or infinite"
        else:
            cause = "the gradients were NaN or infinite (no task loss was reported non-finite)"
        return (
            f"training stopped at step {step}: {self.consecutive} consecutive optimizer steps were skipped "
            f"(max_nonfinite_steps={self.max_consecutive}) because {cause}. The skipped steps did not change "
            "the weights, and checkpoints written before this error are intact (resume with --ckpt_path last "
            "after fixing the cause: bad targets or images of these tasks, a too high learning rate or loss weight)"
        )

    def state_dict(self) -> dict[str, Any]:
        """Counters, for checkpoints (plain ints)."""
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters of :meth:`state_dict`."""
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])


def _copy_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()}
