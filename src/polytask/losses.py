"""Per-task loss functions of the ASTMT / ATRC / InvPT protocol.

Every loss takes raw network outputs (logits) at the target's resolution and a target
tensor that marks ignored pixels with ``IGNORE_INDEX`` (255), and returns a scalar.
Reductions follow the reference implementations: a sum over valid entries divided by the
number of valid pixels.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from polytask.constants import IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel-wise cross-entropy averaged over non-ignored pixels.

    Args:
        logits: ``(B, C, H, W)`` class scores.
        target: ``(B, H, W)`` integer labels; ``ignore_index`` marks ignored pixels.
    """
    loss = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="sum")
    n_valid = (target != ignore_index).sum().clamp(min=1)
    return loss / n_valid


def balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Two-class cross-entropy with class weights balanced over the batch (saliency).

    The weight of class 1 is the fraction of valid pixels labelled 0 and vice versa; the
    weighted per-pixel losses are summed and divided by the number of valid pixels.

    Args:
        logits: ``(B, 2, H, W)`` scores for background / salient.
        target: ``(B, H, W)`` labels in {0, 1}; ``ignore_index`` marks ignored pixels.
    """
    valid = target != ignore_index
    n_valid = valid.sum()
    if n_valid == 0:
        return logits.sum() * 0.0
    labels = target[valid].float()
    if labels.max() > 1:
        raise ValueError(f"balanced_cross_entropy expects binary labels, got max {int(labels.max())}")
    w_pos = (1.0 - labels).sum() / n_valid
    weight = torch.stack((1.0 - w_pos, w_pos)).to(logits.dtype if logits.is_floating_point() else torch.float32)
    loss = F.cross_entropy(logits.float(), target.long(), weight=weight.float(), ignore_index=ignore_index, reduction="none")
    return loss.sum() / n_valid


def normals_l1(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """L1 between the L2-normalised prediction and the target normals.

    A pixel counts when none of its three target channels equals ``ignore_index`` and the
    target is not the zero vector (invalid normals; InvPT turns those into ``ignore_index``
    before its loss); the absolute differences of its three channels are summed and the total
    is divided by the number of valid pixels (ATRC/InvPT reduction).

    Args:
        pred: ``(B, 3, H, W)`` unnormalised normal vectors.
        target: ``(B, 3, H, W)`` unit normals.
    """
    pred = F.normalize(pred.float(), p=2, dim=1)
    mask = (target != ignore_index).all(dim=1, keepdim=True) & (target != 0).any(dim=1, keepdim=True)
    n_valid = mask.sum().clamp(min=1)
    return ((pred - target).abs() * mask).sum() / n_valid


def hed_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 0.95, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HED-style weighted binary cross-entropy for boundaries.

    Mean over valid pixels of ``pos_weight * y * -log(s) + (1 - pos_weight) * (1 - y) * -log(1 - s)``.

    Args:
        logits: ``(B, 1, H, W)`` boundary logits.
        target: ``(B, 1, H, W)`` boundary labels in {0, 1}; ``ignore_index`` marks ignored pixels.
    """
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    x = logits.float()[valid]
    y = target.float()[valid]
    loss = -(pos_weight * y * F.logsigmoid(x) + (1.0 - pos_weight) * (1.0 - y) * F.logsigmoid(-x))
    return loss.mean()


def depth_l1(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """L1 depth loss over valid pixels (target > 0 and not ``ignore_index``).

    Args:
        pred: ``(B, 1, H, W)`` predicted depth.
        target: ``(B, 1, H, W)`` ground-truth depth; 0 is invalid.
    """
    valid = (target > 0) & (target != ignore_index)
    if not valid.any():
        return pred.sum() * 0.0
    return (pred.float()[valid] - target.float()[valid]).abs().mean()


def multilabel_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on sigmoid outputs, averaged over images and attributes.

    Args:
        logits: ``(B, K)`` attribute logits.
        target: ``(B, K)`` labels in {0, 1}.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def binary_segmentation_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    unlabelled: Literal["negative", "ignore"] = "negative",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-pixel binary cross-entropy on one sigmoid logit (Maximum Roaming's binary segmentation loss).

    ``unlabelled="negative"`` (Maximum Roaming: its one-hot labels are 0 on pixels without a
    class) counts ``ignore_index`` pixels as negatives and averages over every pixel;
    ``"ignore"`` averages over the labelled pixels only.

    Args:
        logits: ``(B, 1, H, W)`` logits of the positive class.
        target: ``(B, H, W)`` labels in {0, 1}; ``ignore_index`` marks unlabelled pixels.
        unlabelled: ``"negative"`` or ``"ignore"``.
    """
    if unlabelled not in ("negative", "ignore"):
        raise ValueError(f"unlabelled must be 'negative' or 'ignore', got {unlabelled!r}")
    x = logits.float()[:, 0]
    if unlabelled == "negative":
        return F.binary_cross_entropy_with_logits(x, (target == 1).float())
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(x[valid], target[valid].float())
