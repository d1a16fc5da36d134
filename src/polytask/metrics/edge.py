"""Boundaries: a fast tolerance-based F-measure for monitoring during training.

This is not the SEISM-equivalent odsF of published tables (no NMS, no thinning, no bipartite
matching); that one lives in ``polytask.evaluation``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from polytask.constants import IGNORE_INDEX
from polytask.metrics._common import count_above, safe_div


class BoundaryFMetric(Metric):
    """Best F-measure over thresholds with a pixel tolerance, counts accumulated over the split.

    For a threshold ``t`` the predicted boundary is ``pred > t`` on non-ignored pixels. Its
    precision is the fraction of predicted boundary pixels lying within ``tolerance`` pixels
    (Chebyshev distance, i.e. a ``(2 tolerance + 1)`` square) of a ground-truth boundary pixel;
    its recall is the fraction of ground-truth boundary pixels lying within ``tolerance`` of a
    predicted one. Pixels whose target is ``ignore_index`` take part on neither side. Matched
    and total counts are summed over the split per threshold, ``F = 2 P R / (P + R)`` (0 where
    undefined) and the best ``F`` over thresholds is returned in percent.

    All thresholds are evaluated in one pass: a pixel is near a predicted boundary at
    threshold ``t`` exactly when the maximum prediction in its tolerance window exceeds ``t``,
    so only that one max-pooled map and per-threshold counts are needed.

    Args:
        thresholds: number of thresholds, evenly spaced strictly inside (0, 1).
        tolerance: matching distance in pixels.
        ignore_index: target value of ignored pixels.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    pred_matched: torch.Tensor
    pred_total: torch.Tensor
    gt_matched: torch.Tensor
    gt_total: torch.Tensor
    thresholds: torch.Tensor

    def __init__(self, thresholds: int = 99, tolerance: int = 2, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if thresholds < 1:
            raise ValueError(f"thresholds must be >= 1, got {thresholds}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.tolerance = tolerance
        self.ignore_index = ignore_index
        values = torch.linspace(0.0, 1.0, thresholds + 2, dtype=torch.float64)[1:-1].float()
        self.register_buffer("thresholds", values, persistent=False)
        for name in ("pred_matched", "pred_total", "gt_matched"):
            self.add_state(name, torch.zeros(thresholds, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("gt_total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _dilate(self, x: torch.Tensor) -> torch.Tensor:
        size = 2 * self.tolerance + 1
        return F.max_pool2d(x, kernel_size=size, stride=1, padding=self.tolerance)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: ``(B, 1, H, W)`` boundary probabilities.
            target: ``(B, 1, H, W)`` boundary labels in {0, 1}, or ``ignore_index``.

        Raises:
            ValueError: shapes differ, or a non-ignored target value is not 0 or 1.
        """
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 1:
            raise ValueError(
                f"expected pred and target of shape (B, 1, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        valid = target != self.ignore_index
        bad = valid & (target != 0) & (target != 1)
        if bad.any():
            raise ValueError(f"boundary target contains value {target[bad][0].item()}; expected 0, 1 or {self.ignore_index}")
        gt_edge = valid & (target == 1)
        near_gt = self._dilate(gt_edge.float()) > 0
        prob = pred.float().masked_fill(~valid, float("-inf"))
        near_pred_max = self._dilate(prob)
        self.pred_total += count_above(prob[valid], self.thresholds, inclusive=False)
        self.pred_matched += count_above(prob[valid & near_gt], self.thresholds, inclusive=False)
        self.gt_matched += count_above(near_pred_max[gt_edge], self.thresholds, inclusive=False)
        self.gt_total += gt_edge.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"F_tol"}`` in percent (float64 scalar)."""
        precision = safe_div(self.pred_matched, self.pred_total)
        recall = safe_div(self.gt_matched, self.gt_total.expand_as(self.gt_matched))
        f = safe_div(2.0 * precision * recall, precision + recall)
        return {"F_tol": 100.0 * f.max()}
