"""Depth: RMSE, log-RMSE and absolute / relative errors over all valid pixels of the split."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from polytask.constants import IGNORE_INDEX
from polytask.metrics._common import safe_div

LOG_EPS = 1e-9


class DepthMetric(Metric):
    """Depth errors accumulated over every valid pixel of the split.

    Valid pixels: ``target > 0`` and ``target != ignore_index``. With ``e = pred - target``
    over all valid pixels of the split (not per image):

    - ``rmse = sqrt(sum e^2 / n)`` (InvPT / ATRC);
    - ``log_rmse = sqrt(sum (ln max(pred, 1e-9) - ln target)^2 / n)`` (InvPT / ATRC);
    - ``abs_rel = sum(|e| / target) / n`` (LibMTL's "rel err");
    - ``abs_err = sum |e| / n`` (LibMTL's "abs err").

    LibMTL weights its per-batch errors by the batch's valid pixels, which gives these split-wide
    means. MTAN's and Maximum Roaming's "abs err" / "rel err" are unweighted means of per-batch
    values instead, so they differ: ``protocol: maximum_roaming``
    (:class:`~polytask.metrics.maximum_roaming.MaximumRoamingDepthMetric`) reproduces them.

    Args:
        ignore_index: target value of ignored (padding) pixels.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    sum_sq_err: torch.Tensor
    sum_sq_log_err: torch.Tensor
    sum_abs_err: torch.Tensor
    sum_rel_err: torch.Tensor
    count: torch.Tensor

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        for name in ("sum_sq_err", "sum_sq_log_err", "sum_abs_err", "sum_rel_err"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: ``(B, 1, H, W)`` predicted depth.
            target: ``(B, 1, H, W)`` depth; 0 invalid, ``ignore_index`` ignored.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        valid = (target > 0) & (target != self.ignore_index)
        p = pred[valid].double()
        g = target[valid].double()
        err = p - g
        self.sum_sq_err += err.square().sum()
        self.sum_sq_log_err += (p.clamp(min=LOG_EPS).log() - g.log()).square().sum()
        self.sum_abs_err += err.abs().sum()
        self.sum_rel_err += (err.abs() / g).sum()
        self.count += g.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"rmse", "log_rmse", "abs_rel", "abs_err"}`` (float64 scalars; NaN before any valid pixel)."""
        nan = float("nan")
        return {
            "rmse": safe_div(self.sum_sq_err, self.count, fill=nan).sqrt(),
            "log_rmse": safe_div(self.sum_sq_log_err, self.count, fill=nan).sqrt(),
            "abs_rel": safe_div(self.sum_rel_err, self.count, fill=nan),
            "abs_err": safe_div(self.sum_abs_err, self.count, fill=nan),
        }
