"""The metrics exactly as Maximum Roaming's scripts print them (``protocol: maximum_roaming``).

Maximum Roaming (Pascal et al., AAAI 2021; ``lucaspascal/Maximum-Roaming-Mutli-Task-Learning``)
scores NYUv2 and Cityscapes (MTAN's pre-processing) and CelebA in the evaluation loop of its
training scripts (``nyuv2/train_*.py``, ``cityscapes/train_*.py``, ``celeba/train_*.py``). ETR-NLP
and other papers comparing with it report these numbers. They differ from the split-level metrics
of :mod:`polytask.metrics`:

- segmentation scores every class as a binary mask (a one-hot target, ignored pixels negative for
  every class); a class's IoU is the mean over batches of the mean over the batch's images of that
  image's IoU; pixel accuracy is the binary accuracy of the masks, averaged over classes and
  batches;
- depth and normal errors are computed per batch and averaged over batches;
- CelebA accuracy is averaged over batches (precision, recall and F1 come from split-level counts).

Every per-batch average depends on how the split is cut into batches: the metrics record the
largest batch they saw (``batch_size`` in their results) and equal Maximum Roaming's numbers when
fed the split in file order at its scripts' batch sizes (NYUv2 2, Cityscapes 8, CelebA 256), in one
process. Maximum Roaming accumulates in float32; these metrics in float64 (differences of the
order of 1e-7 relative, below the 4 decimals its scripts print).

Units follow polytask's tables: IoU, pixel accuracy and the normal-angle fractions in percent
(the scripts print fractions: 0.2037 is mIoU 20.37), errors and angles as printed, CelebA scores
as fractions.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from polytask.constants import IGNORE_INDEX
from polytask.metrics._common import safe_div
from polytask.metrics.attributes import AttributeMetric
from polytask.metrics.normals import WITHIN_DEGREES

MR_EPS = 1e-7
"""The constant Maximum Roaming's CelebA scripts add to the denominators of precision, recall and F1."""


def _add_batch_states(metric: Metric) -> None:
    """Add the batch count (summed over processes) and the largest batch size (max over processes)."""
    metric.add_state("batches", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
    metric.add_state("batch_size", torch.zeros((), dtype=torch.long), dist_reduce_fx="max")


def _count_batch(metric: Metric, size: int) -> None:
    metric.batches += 1
    metric.batch_size.clamp_(min=size)


def _batch_mean(metric: Metric, total: torch.Tensor) -> torch.Tensor:
    """``total / batches`` in float64; NaN before any batch."""
    return safe_div(total, metric.batches, fill=float("nan"))


def median_as_numpy(values: torch.Tensor) -> torch.Tensor:
    """``np.median`` of a 1-D tensor: the middle value, or the mean of the two middle values.

    Args:
        values: ``(N,)`` floating point.

    Returns:
        0-dim float64; NaN when ``N == 0`` (as ``np.median`` of an empty array).
    """
    n = values.numel()
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=values.device)
    ordered = values.double().sort().values
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2.0


class MaximumRoamingSegmentationMetric(Metric):
    """Per-image binary IoU and binary pixel accuracy, averaged per batch, as Maximum Roaming prints them.

    Every scored class ``c`` is a binary mask: predicted ``pred == c`` (Maximum Roaming thresholds
    a per-class sigmoid at 0.5), true ``target == c``. Ignored pixels are negative for every class
    (its loader one-hot encodes the labels and drops the channel of the ignore label -1), so a
    pixel predicted ``c`` there is a false positive and one predicted otherwise is correct.

    - IoU of class ``c`` in a batch: the mean, over the images of the batch whose union of true
      and predicted masks is not empty, of ``|P & T| / |P | T|`` per image; a batch in which no
      image has a non-empty union is skipped for ``c``. The class's IoU is the mean of its batch
      IoUs over the batches not skipped, 0 when every batch was skipped (the script's
      accumulator stays 0). ``mIoU`` is the mean over the scored classes, absent ones included.
    - ``pixel_acc``: per batch, the fraction of (image, class, pixel) triples where the predicted
      and the true mask agree (ignored pixels included); averaged over batches.

    With ``positive_class`` set (a one-vs-rest task: Maximum Roaming's binary split, one task per
    class) only that class is scored, so ``mIoU`` is that class's IoU (the script's ``IOU_<k>``);
    the script's ``MEAN_IOU`` and ``PIX_ACC`` are the means of the per-class tasks' values.

    Sources: ``compute_miou``, ``compute_pix_acc`` and the evaluation loop of
    ``nyuv2/train_MR.py`` (also ``train_TR.py``, ``train_SE.py``; ``train_MTL.py`` and
    ``train_gradnorm.py`` score all classes at once with the same result), and of
    ``cityscapes/train_MR.py``. The Cityscapes per-task scripts divide a class's summed batch IoUs by
    the number of all batches, but crash (``float.item()``) on a batch where the class has an empty
    union, so whenever they print a number it equals the rule above.

    Args:
        num_classes: classes ``C`` of the labels.
        positive_class: score only this class (one-vs-rest task); None scores all ``C``.
        ignore_index: target value of ignored pixels (negative for every class).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    iou_sum: torch.Tensor
    iou_batches: torch.Tensor
    acc_sum: torch.Tensor
    batches: torch.Tensor
    batch_size: torch.Tensor
    classes: torch.Tensor

    def __init__(
        self, num_classes: int, positive_class: int | None = None, ignore_index: int = IGNORE_INDEX, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if positive_class is not None and not 0 <= positive_class < num_classes:
            raise ValueError(f"positive_class must lie in 0..{num_classes - 1}, got {positive_class}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        scored = list(range(num_classes)) if positive_class is None else [positive_class]
        self.register_buffer("classes", torch.tensor(scored, dtype=torch.long), persistent=False)
        self.add_state("iou_sum", torch.zeros(len(scored), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_batches", torch.zeros(len(scored), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("acc_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        _add_batch_states(self)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch (Maximum Roaming's unit of averaging).

        Args:
            pred: ``(B, H, W)`` integer labels.
            target: ``(B, H, W)`` integer labels in ``0..C-1`` or ``ignore_index``.

        Raises:
            ValueError: wrong shapes, or a non-ignored target value outside ``0..C-1``.
            TypeError: floating-point labels.
        """
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(
                f"expected pred and target of shape (B, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(f"expected integer labels, got pred {pred.dtype} and target {target.dtype}")
        valid = target != self.ignore_index
        bad = valid & ((target < 0) | (target >= self.num_classes))
        if bad.any():
            raise ValueError(
                f"target contains class id {int(target[bad][0])} outside 0..{self.num_classes - 1} "
                f"(and not the ignore index {self.ignore_index})"
            )
        b = pred.shape[0]
        if b == 0:
            return
        classes = self.classes.view(1, -1, 1)
        predicted = pred.reshape(b, 1, -1).long() == classes  # (B, K, H*W)
        true = (target.reshape(b, 1, -1).long() == classes) & valid.reshape(b, 1, -1)
        union = (predicted | true).sum(dim=2)  # (B, K)
        intersection = (predicted & true).sum(dim=2)
        counted = union > 0
        image_iou = safe_div(intersection, union)  # 0 where the union is empty (not counted)
        images = counted.sum(dim=0)  # (K,)
        batch_iou = safe_div(image_iou.sum(dim=0), images)
        self.iou_sum += torch.where(images > 0, batch_iou, torch.zeros_like(batch_iou))
        self.iou_batches += (images > 0).long()
        self.acc_sum += (predicted == true).double().mean()
        _count_batch(self, b)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"mIoU", "pixel_acc"}`` in percent and ``{"batch_size"}`` (float64 scalars)."""
        iou = safe_div(self.iou_sum, self.iou_batches)
        return {
            "mIoU": 100.0 * iou.mean(),
            "pixel_acc": 100.0 * _batch_mean(self, self.acc_sum),
            "batch_size": self.batch_size.double(),
        }


class MaximumRoamingDepthMetric(Metric):
    """Absolute and relative depth error per batch, averaged over batches (Maximum Roaming's ``depth_error``).

    Valid pixels: ``target != 0`` (the script's ``sum over channels != 0``, so a negative target
    counts) and not ``ignore_index`` (polytask's padding, absent from Maximum Roaming's data). Per
    batch, with ``n`` its valid pixels: ``abs_err = sum |pred - target| / n`` and
    ``abs_rel = sum(|pred - target| / target) / n`` (the script's ``REL_ERR``); each is averaged
    over batches. A batch without a valid pixel makes both NaN, as in the script (0 / 0).

    Source: ``depth_error`` and the evaluation loops of ``nyuv2/train_*.py`` and
    ``cityscapes/train_*.py`` (identical in every script).

    Args:
        ignore_index: target value of ignored (padding) pixels.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    abs_sum: torch.Tensor
    rel_sum: torch.Tensor
    batches: torch.Tensor
    batch_size: torch.Tensor

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("abs_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rel_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        _add_batch_states(self)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            pred: ``(B, 1, H, W)`` predicted depth.
            target: ``(B, 1, H, W)`` depth; 0 invalid, ``ignore_index`` ignored.
        """
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 1:
            raise ValueError(
                f"expected pred and target of shape (B, 1, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if pred.shape[0] == 0:
            return
        valid = (target != 0) & (target != self.ignore_index)
        p = pred[valid].double()
        g = target[valid].double()
        n = torch.tensor(g.numel(), dtype=torch.float64, device=g.device)
        err = (p - g).abs()
        self.abs_sum += err.sum() / n
        self.rel_sum += (err / g).sum() / n
        _count_batch(self, pred.shape[0])

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"abs_err", "abs_rel", "batch_size"}`` (float64 scalars; NaN before any batch)."""
        return {
            "abs_err": _batch_mean(self, self.abs_sum),
            "abs_rel": _batch_mean(self, self.rel_sum),
            "batch_size": self.batch_size.double(),
        }


class MaximumRoamingNormalsMetric(Metric):
    """Angular error statistics per batch, averaged over batches (Maximum Roaming's ``normal_error``).

    Valid pixels: the target's components do not sum to 0 (the script's mask: a unit normal
    such as ``(0.6, -0.6, 0.53)`` counts, ``(0.7071, -0.7071, 0)`` does not) and no component is
    ``ignore_index``. The angle is ``degrees(arccos(clamp(pred . target, -1, 1)))`` with the dot
    product in float32 and neither vector re-normalised (the script's network outputs unit vectors,
    as :class:`~polytask.tasks.NormalsTask` post-processing does; the target is used as stored).
    Per batch: the mean, ``np.median`` (the mean of the two middle angles for an even count) and
    the fractions of angles strictly below 11.25 / 22.5 / 30 degrees; each averaged over batches.
    A batch without a valid pixel makes them NaN, as ``np.mean`` of an empty array.

    Source: ``normal_error`` and the evaluation loops of ``nyuv2/train_*.py`` (identical in every
    script).

    Args:
        ignore_index: target value of ignored (padding) pixels.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    mean_sum: torch.Tensor
    median_sum: torch.Tensor
    within_sum: torch.Tensor
    batches: torch.Tensor
    batch_size: torch.Tensor

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("mean_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("median_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("within_sum", torch.zeros(len(WITHIN_DEGREES), dtype=torch.float64), dist_reduce_fx="sum")
        _add_batch_states(self)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            pred: ``(B, 3, H, W)`` unit normals.
            target: ``(B, 3, H, W)`` normals; components summing to 0 invalid, ``ignore_index`` ignored.
        """
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"expected pred and target of shape (B, 3, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if pred.shape[0] == 0:
            return
        gt = target.float()
        valid = (gt.sum(dim=1) != 0) & (gt != self.ignore_index).all(dim=1)
        cosine = (pred.float() * gt).sum(dim=1)[valid]
        angle = torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0)).double())
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=angle.device)
        self.mean_sum += angle.mean() if angle.numel() else nan
        self.median_sum += median_as_numpy(angle)
        self.within_sum += torch.stack([(angle < d).double().mean() if angle.numel() else nan for d in WITHIN_DEGREES])
        _count_batch(self, pred.shape[0])

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"mean", "median"}`` in degrees, ``{"11.25", "22.5", "30"}`` in percent, ``{"batch_size"}``."""
        result = {"mean": _batch_mean(self, self.mean_sum), "median": _batch_mean(self, self.median_sum)}
        for degrees, total in zip(WITHIN_DEGREES, self.within_sum):
            result[f"{degrees:g}"] = 100.0 * _batch_mean(self, total)
        result["batch_size"] = self.batch_size.double()
        return result


class MaximumRoamingAttributeMetric(AttributeMetric):
    """CelebA scores as Maximum Roaming's scripts print them.

    An attribute is present when its probability is ``>= threshold`` (0.5). Over the split, per
    attribute: ``precision = TP / (TP + FP + 1e-7)``, ``recall = TP / (TP + FN + 1e-7)``,
    ``f1 = 2 P R / (P + R + 1e-7)`` (with the split's P and R: the split-level values up to the
    1e-7 terms, 0 where undefined); ``accuracy`` is the fraction of correct images per batch,
    averaged over batches (so a short last batch weighs as much as a full one). Each is averaged
    over the attributes (per group here; :meth:`per_attribute` gives the values for the average
    over all 40 attributes that the scripts print).

    The scripts evaluate on the **val** partition (``split='val'``: ``list_eval_partition`` code
    1), in file order, at batch size 256.

    Source: the evaluation loop of ``celeba/train_MR.py`` (identical in ``train_MTL.py``,
    ``train_SE.py``, ``train_TR.py``, ``train_gradnorm.py``, ``train_MGDA.py``, ``train_SL.py``) and
    ``celeba/dataset.py``.

    Args:
        num_attributes: number of attributes ``K``.
        threshold: probability threshold.
    """

    acc_sum: torch.Tensor
    batches: torch.Tensor
    batch_size: torch.Tensor

    def __init__(self, num_attributes: int, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(num_attributes, threshold, **kwargs)
        self.add_state("acc_sum", torch.zeros(num_attributes, dtype=torch.float64), dist_reduce_fx="sum")
        _add_batch_states(self)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``pred`` ``(B, K)`` probabilities, ``target`` ``(B, K)`` labels in {0, 1}."""
        super().update(pred, target)
        if pred.shape[0] == 0:
            return
        self.acc_sum += ((pred >= self.threshold) == (target == 1)).double().mean(dim=0)
        _count_batch(self, pred.shape[0])

    def _per_attribute(self) -> dict[str, torch.Tensor]:
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        precision = tp / (tp + fp + MR_EPS)
        recall = tp / (tp + fn + MR_EPS)
        return {
            "precision": precision,
            "recall": recall,
            "f1": 2.0 * precision * recall / (precision + recall + MR_EPS),
            "accuracy": _batch_mean(self, self.acc_sum),
        }

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"precision", "recall", "f1", "accuracy"}`` averaged over attributes, and ``{"batch_size"}``."""
        return {**super().compute(), "batch_size": self.batch_size.double()}
