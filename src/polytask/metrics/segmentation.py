"""Semantic segmentation / human parts: mIoU and pixel accuracy from a split-wide confusion matrix."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torchmetrics import Metric

from polytask.constants import IGNORE_INDEX
from polytask.metrics._common import safe_div, synced_states

AbsentClassPolicy = Literal["zero", "nan"]


class SegmentationMetric(Metric):
    """mIoU and pixel accuracy over a whole split.

    A ``(C, C + 1)`` confusion matrix (rows: ground truth, columns: prediction) is accumulated
    over all non-ignored pixels of all ``update`` calls; the extra last column collects
    predictions outside ``0..C-1``, which are wrong for their ground-truth class (a false
    negative) without being a false positive of any class. Per class,
    ``IoU = TP / (TP + FP + FN)``.

    ``absent_class_policy`` decides what a class absent from both the prediction and the
    ground truth of the whole split scores: ``"zero"`` gives it IoU 0 and keeps it in the mean
    (InvPT / ATRC evaluation), ``"nan"`` gives it NaN and leaves it out of the mean.

    Args:
        num_classes: number of classes ``C``.
        ignore_index: target value of ignored pixels.
        absent_class_policy: ``"zero"`` or ``"nan"``, see above.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        absent_class_policy: AbsentClassPolicy = "zero",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if absent_class_policy not in ("zero", "nan"):
            raise ValueError(f"absent_class_policy must be 'zero' or 'nan', got {absent_class_policy!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.absent_class_policy = absent_class_policy
        self.add_state("confmat", torch.zeros(num_classes, num_classes + 1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch to the confusion matrix.

        Args:
            pred: ``(B, H, W)`` integer labels.
            target: ``(B, H, W)`` integer labels in ``0..C-1`` or ``ignore_index``.

        Raises:
            ValueError: shapes differ, or a non-ignored target value lies outside ``0..C-1``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(f"expected integer labels, got pred {pred.dtype} and target {target.dtype}")
        c = self.num_classes
        target = target.reshape(-1).long()
        valid = target != self.ignore_index
        gt = target[valid]
        bad = (gt < 0) | (gt >= c)
        if bad.any():
            raise ValueError(
                f"target contains class id {int(gt[bad][0])} outside 0..{c - 1} "
                f"(and not the ignore index {self.ignore_index})"
            )
        pr = pred.reshape(-1).long()[valid]
        pr = torch.where((pr >= 0) & (pr < c), pr, torch.full_like(pr, c))
        self.confmat += torch.bincount(gt * (c + 1) + pr, minlength=c * (c + 1)).reshape(c, c + 1)

    def _iou(self) -> torch.Tensor:
        tp = self.confmat.diagonal()
        fn = self.confmat.sum(dim=1) - tp
        fp = self.confmat[:, : self.num_classes].sum(dim=0) - tp
        fill = 0.0 if self.absent_class_policy == "zero" else float("nan")
        return safe_div(tp, tp + fp + fn, fill=fill)

    def per_class_iou(self) -> torch.Tensor:
        """IoU of every class over the split so far, in percent, ``(C,)`` float64.

        Absent classes are 0 or NaN according to ``absent_class_policy``.
        """
        with synced_states(self):
            return 100.0 * self._iou()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"mIoU", "pixel_acc"}`` in percent (float64 scalars)."""
        iou = self._iou()
        miou = iou.mean() if self.absent_class_policy == "zero" else iou.nanmean()
        pixel_acc = safe_div(self.confmat.diagonal().sum(), self.confmat.sum(), fill=float("nan"))
        return {"mIoU": 100.0 * miou, "pixel_acc": 100.0 * pixel_acc}
