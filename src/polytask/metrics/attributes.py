"""Binary attributes (CelebA): per-attribute precision, recall, F1 and accuracy, averaged."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from polytask.metrics._common import safe_div, synced_states


class AttributeMetric(Metric):
    """Per-attribute confusion counts over the split, scores averaged over attributes.

    An attribute is predicted present when its probability is ``>= threshold`` (at the
    default 0.5, a logit ``>= 0``). TP / FP / FN / TN of every attribute are summed over the
    split; precision ``TP / (TP + FP)``, recall ``TP / (TP + FN)``, F1
    ``2 TP / (2 TP + FP + FN)`` and accuracy ``(TP + TN) / N`` are computed per attribute (0
    where undefined) and averaged over the attributes, as fractions in [0, 1] (the CelebA
    literature's convention).

    Args:
        num_attributes: number of attributes ``K``.
        threshold: probability threshold.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    tn: torch.Tensor

    def __init__(self, num_attributes: int, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_attributes < 1:
            raise ValueError(f"num_attributes must be >= 1, got {num_attributes}")
        self.num_attributes = num_attributes
        self.threshold = threshold
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(name, torch.zeros(num_attributes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: ``(B, K)`` probabilities.
            target: ``(B, K)`` labels in {0, 1}.

        Raises:
            ValueError: wrong shapes, or a target value other than 0 and 1.
        """
        if pred.shape != target.shape or pred.dim() != 2 or pred.shape[1] != self.num_attributes:
            raise ValueError(
                f"expected pred and target of shape (B, {self.num_attributes}), "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        bad = (target != 0) & (target != 1)
        if bad.any():
            raise ValueError(f"attribute target contains value {target[bad][0].item()}; expected 0 or 1")
        predicted = pred >= self.threshold
        present = target == 1
        self.tp += (predicted & present).sum(dim=0)
        self.fp += (predicted & ~present).sum(dim=0)
        self.fn += (~predicted & present).sum(dim=0)
        self.tn += (~predicted & ~present).sum(dim=0)

    def _per_attribute(self) -> dict[str, torch.Tensor]:
        total = self.tp + self.fp + self.fn + self.tn
        return {
            "precision": 100.0 * safe_div(self.tp, self.tp + self.fp),
            "recall": 100.0 * safe_div(self.tp, self.tp + self.fn),
            "f1": 100.0 * safe_div(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "accuracy": 100.0 * safe_div(self.tp + self.tn, total),
        }

    def per_attribute(self) -> dict[str, torch.Tensor]:
        """``{"precision", "recall", "f1", "accuracy"}``, each ``(K,)`` float64, in percent.

        For averaging over attributes from several groups (e.g. all 40 CelebA attributes).
        """
        with synced_states(self):
            return self._per_attribute()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"precision", "recall", "f1", "accuracy"}`` averaged over attributes, in percent."""
        return {name: values.mean() for name, values in self._per_attribute().items()}
