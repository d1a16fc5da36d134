"""The base of the weighting strategies: :class:`Weighting`, the process-averaging ``Reduce`` and
the per-task gradient helpers shared by GradNorm, gradient aggregation and the interference
diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Averages a tensor over the processes of a distributed run (the identity in one process)."""


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def gradient_matrix(losses: Sequence[torch.Tensor], params: Sequence[nn.Parameter]) -> torch.Tensor:
    """Per-task gradients on ``params``, flattened: ``(T, P)`` in float32, one row per loss.

    Each loss is back-propagated alone (the graph is kept for the training step's own backward);
    a parameter a loss does not reach contributes zeros to its row.
    """
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)]))
    return torch.stack(rows)


def average_gradients(params: Sequence[nn.Parameter], reduce: Reduce) -> None:
    """Average the ``.grad`` of ``params`` over the processes of a distributed run, in one ``reduce``.

    A parameter without a gradient in some process counts as a zero gradient there; one without a
    gradient in every process keeps none."""
    if not params:
        return
    device = params[0].device
    present = reduce(torch.tensor([float(p.grad is not None) for p in params], device=device)) > 0
    kept = [p for p, keep in zip(params, present.tolist()) if keep]
    if not kept:
        return
    flat = reduce(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in kept]))
    for p, grad in zip(kept, flat.split([p.numel() for p in kept])):
        p.grad = grad.view_as(p).to(p.dtype).clone()


def shared_parameters_of(net: nn.Module) -> list[nn.Parameter]:
    """``net.shared_parameters()`` (:class:`~polytask.models.base.MultiTaskNet`), or ``[]`` for a
    network without that method."""
    return list(net.shared_parameters()) if hasattr(net, "shared_parameters") else []


class Weighting(nn.Module):
    """Base class: turns the task losses of a training step into the total to back-propagate.

    Subclasses implement :meth:`forward` (and may override :meth:`set_epoch`, :meth:`update`);
    :meth:`setup` is called once by the module, before training, with the task names and the
    fixed loss weights (the dataset's defaults merged with ``loss_weights``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.loss_weights: dict[str, float] = {}
        self.last_weights: dict[str, torch.Tensor | float] = {}

    def setup(self, names: Sequence[str], loss_weights: Mapping[str, float]) -> None:
        """Learn the task names (their order is the order of every per-task tensor) and fixed weights."""
        self.names = list(names)
        self.loss_weights = {n: float(loss_weights.get(n, 1.0)) for n in self.names}

    per_task_steps: bool = False
    """True when the strategy also weights training with one optimizer step per task
    (:meth:`per_task_weights`: weights known before the step's losses)."""

    owns_backward: bool = False
    """Whether the strategy computes the parameters' gradients itself (:meth:`backward`) instead
    of the module back-propagating the total (gradient aggregation)."""

    def attach(self, net: nn.Module) -> None:
        """Called once by the module, after :meth:`setup`, with its network; a strategy that reads
        gradients of the network's parameters picks them here (the default reads none)."""

    def backward(self, total: torch.Tensor, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity, world_size: int = 1) -> None:
        """Fill the parameters' ``.grad`` for the step whose total is ``total`` and task losses
        ``losses`` (with their graphs); only strategies with :attr:`owns_backward` implement it.

        In a distributed run (``world_size`` processes, ``reduce`` averaging over them) the module
        has turned DDP's own gradient averaging off: the strategy leaves every process with the
        gradients of one process holding the whole batch."""
        raise NotImplementedError(f"{type(self).__name__} leaves the backward pass to the module")

    @property
    def num_tasks(self) -> int:
        return len(self.names)

    def _stack(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        missing = sorted(set(self.names) - set(losses))
        if missing:
            raise KeyError(f"{type(self).__name__}: no loss for task(s) {missing}; tasks: {self.names}")
        return torch.stack([losses[n].float() for n in self.names])

    def _weighted(self, losses: Mapping[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """``sum_t weights[t] * losses[t]``; records the weights in :attr:`last_weights`."""
        stacked = self._stack(losses)
        self.last_weights = {n: w for n, w in zip(self.names, weights.detach().unbind())}
        return (weights.to(stacked.device) * stacked).sum()

    def set_epoch(self, epoch: int) -> None:
        """Called at every training step, before :meth:`forward`, with the current epoch."""

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> None:
        """Called after every training step with the detached task losses."""

    def per_task_weights(self) -> dict[str, torch.Tensor | float]:
        """The weights of a training step whose task losses come one at a time (one optimizer step
        per task, :class:`~polytask.training.PerTaskModule`), known before any of them; records them
        in :attr:`last_weights`. Only strategies with :attr:`per_task_steps` implement it."""
        raise ValueError(f"weighting {type(self).__name__} needs every task's loss (or gradient) of the same step at once")

    def task_term(self, name: str, loss: torch.Tensor, weights: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """Task ``name``'s part of the total, for its own optimizer step: ``weights[name] * loss`` by
        default (``weights`` from :meth:`per_task_weights`)."""
        return weights[name] * loss
