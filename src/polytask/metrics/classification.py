"""Top-1 accuracy of image-level classification."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric


class ClassificationAccuracy(Metric):
    """Top-1 accuracy over a split in percent: ``{"accuracy": 100 * correct / total}``.

    ``update(pred (B,) int64 labels, target (B,) int64 labels)``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true labels, both ``(B,)``."""
        if pred.shape != target.shape or pred.dim() != 1:
            raise ValueError(f"expected pred and target of shape (B,), got {tuple(pred.shape)} and {tuple(target.shape)}")
        self.correct += (pred == target).sum()
        self.total += target.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"accuracy": ...}`` (0 for an empty split)."""
        return {"accuracy": 100.0 * self.correct.double() / self.total.clamp(min=1).double()}
