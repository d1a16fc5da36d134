"""Saliency: maximum F-measure over thresholds, precision and recall accumulated over the split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from polytask.constants import IGNORE_INDEX
from polytask.metrics._common import count_above, safe_div

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))


class SaliencyMetric(Metric):
    """maxF of the InvPT evaluation protocol.

    For every threshold ``t`` a pixel is predicted salient when its probability is ``>= t``
    (the comparison of the InvPT evaluation). TP / FP / FN per threshold are summed over all
    non-ignored pixels of the split; precision and recall come from those totals, then
    ``F = (1 + beta2) P R / (beta2 P + R)`` (0 where undefined) and ``maxF`` is the best ``F``
    over the thresholds, in percent.

    ``legacy_sigmoid=True`` reproduces the InvPT-family quirk (InvPT, TaskPrompter, MLoRE,
    TaskExpert numbers): a sigmoid is applied to the already-normalised probability before
    thresholding, which squashes it into [0.5, 0.73] and lowers maxF. Off by default; say which
    setting a reported number used.

    Args:
        thresholds: probability thresholds; default 0.05, 0.10, ..., 0.95 (19 values).
        beta2: ``beta^2`` of the F-measure.
        legacy_sigmoid: apply ``sigmoid`` to the probabilities first (see above).
        ignore_index: target value of ignored pixels.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    thresholds: torch.Tensor

    def __init__(
        self,
        thresholds: Sequence[float] | None = None,
        beta2: float = 0.3,
        legacy_sigmoid: bool = False,
        ignore_index: int = IGNORE_INDEX,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        values = DEFAULT_THRESHOLDS if thresholds is None else tuple(thresholds)
        if not values:
            raise ValueError("thresholds must not be empty")
        if beta2 <= 0:
            raise ValueError(f"beta2 must be positive, got {beta2}")
        self.beta2 = beta2
        self.legacy_sigmoid = legacy_sigmoid
        self.ignore_index = ignore_index
        self.register_buffer("thresholds", torch.tensor(sorted(values), dtype=torch.float32), persistent=False)
        n = len(values)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: ``(B, H, W)`` probability of the salient class.
            target: ``(B, H, W)`` labels in {0, 1}, or ``ignore_index``.

        Raises:
            ValueError: shapes differ, or a non-ignored target value is not 0 or 1.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        valid = target != self.ignore_index
        gt = target[valid]
        bad = (gt != 0) & (gt != 1)
        if bad.any():
            raise ValueError(f"saliency target contains value {gt[bad][0].item()}; expected 0, 1 or {self.ignore_index}")
        prob = pred[valid].float()
        if self.legacy_sigmoid:
            prob = torch.sigmoid(prob)
        salient = gt == 1
        predicted = count_above(prob, self.thresholds, inclusive=True)
        tp = count_above(prob[salient], self.thresholds, inclusive=True)
        self.tp += tp
        self.fp += predicted - tp
        self.fn += salient.sum() - tp

    def _f_measure(self) -> torch.Tensor:
        precision = safe_div(self.tp, self.tp + self.fp)
        recall = safe_div(self.tp, self.tp + self.fn)
        return safe_div((1.0 + self.beta2) * precision * recall, self.beta2 * precision + recall)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"maxF"}`` in percent (float64 scalar)."""
        return {"maxF": 100.0 * self._f_measure().max()}
