"""Surface normals: angular error statistics over all valid pixels of the split."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from polytask.constants import IGNORE_INDEX
from polytask.metrics._common import safe_div

WITHIN_DEGREES: tuple[float, ...] = (11.25, 22.5, 30.0)


class NormalsMetric(Metric):
    """Angular error between predicted and ground-truth normals.

    A pixel is valid when none of its target channels equals ``ignore_index`` and the target
    vector is non-zero. Both vectors are L2-normalised and the angle is
    ``2 * atan2(|p - g|, |p + g|)`` in degrees (numerically stable at 0 and 180 degrees).
    Sums of angles and squared angles, the number of angles strictly below 11.25 / 22.5 / 30
    degrees and a histogram of angles are accumulated over the split. The median is read from
    the histogram (linear interpolation inside the bin holding the middle rank), so it is
    accurate to ``1 / bins_per_degree`` degrees.

    Args:
        bins_per_degree: histogram resolution for the median.
        ignore_index: target value of ignored pixels.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    sum_angle: torch.Tensor
    sum_sq_angle: torch.Tensor
    count: torch.Tensor
    within: torch.Tensor
    hist: torch.Tensor

    def __init__(self, bins_per_degree: int = 100, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if bins_per_degree < 1:
            raise ValueError(f"bins_per_degree must be >= 1, got {bins_per_degree}")
        self.bins_per_degree = bins_per_degree
        self.ignore_index = ignore_index
        self.add_state("sum_angle", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq_angle", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(len(WITHIN_DEGREES), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hist", torch.zeros(180 * bins_per_degree, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: ``(B, 3, H, W)`` normal vectors (normalised here).
            target: ``(B, 3, H, W)`` unit normals; zero vectors invalid, ``ignore_index`` ignored.
        """
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"expected pred and target of shape (B, 3, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        gt = target.float().movedim(1, -1)
        valid = (gt != self.ignore_index).all(dim=-1) & (gt.norm(dim=-1) != 0)
        p = F.normalize(pred.float().movedim(1, -1)[valid], dim=-1)
        g = F.normalize(gt[valid], dim=-1)
        angle = torch.rad2deg(2.0 * torch.atan2((p - g).norm(dim=-1), (p + g).norm(dim=-1)))
        self.sum_angle += angle.double().sum()
        self.sum_sq_angle += angle.double().square().sum()
        self.count += angle.numel()
        self.within += torch.stack([(angle < d).sum() for d in WITHIN_DEGREES])
        bins = (angle * self.bins_per_degree).long().clamp_(0, self.hist.numel() - 1)
        self.hist += torch.bincount(bins, minlength=self.hist.numel())

    def _median(self) -> torch.Tensor:
        half = self.count.double() / 2.0
        cum = self.hist.cumsum(0).double()
        k = torch.searchsorted(cum, half.reshape(1)).clamp_(max=self.hist.numel() - 1)[0]
        before = cum[k] - self.hist[k]
        frac = safe_div(half - before, self.hist[k])
        return (k + frac) / self.bins_per_degree

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"mean", "median", "rmse"}`` in degrees and ``{"11.25", "22.5", "30"}`` in percent."""
        nan = float("nan")
        median = self._median() if self.count > 0 else torch.tensor(nan, dtype=torch.float64, device=self.count.device)
        result = {
            "mean": safe_div(self.sum_angle, self.count, fill=nan),
            "median": median,
            "rmse": safe_div(self.sum_sq_angle, self.count, fill=nan).sqrt(),
        }
        for degrees, n in zip(WITHIN_DEGREES, self.within):
            result[f"{degrees:g}"] = 100.0 * safe_div(n, self.count, fill=nan)
        return result
