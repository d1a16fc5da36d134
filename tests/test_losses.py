"""Losses against hand-computed values."""

import math

import torch

from polytask import losses


def test_cross_entropy_ignores_255_and_averages_over_valid_pixels() -> None:
    logits = torch.zeros(1, 3, 1, 3)
    logits[0, 0, 0, 0] = math.log(2.0)  # p(class 0) = 2/4 at pixel 0
    target = torch.tensor([[[0, 1, 255]]])
    expected = (-math.log(0.5) - math.log(1 / 3)) / 2  # pixel 1: uniform over 3 classes
    assert math.isclose(losses.cross_entropy(logits, target).item(), expected, rel_tol=1e-6)


def test_balanced_cross_entropy_weights_by_batch_class_frequency() -> None:
    logits = torch.zeros(1, 2, 1, 4)  # p = 0.5 everywhere: per-pixel CE = log 2
    target = torch.tensor([[[0, 0, 0, 1]]])
    # w_pos = fraction of negatives = 3/4; class weights (1 - w_pos, w_pos) = (1/4, 3/4)
    expected = (3 * 0.25 * math.log(2) + 0.75 * math.log(2)) / 4
    assert math.isclose(losses.balanced_cross_entropy(logits, target).item(), expected, rel_tol=1e-6)
    target_ignored = torch.tensor([[[0, 0, 0, 255]]])
    # only negatives: w_pos = 1, class-0 weight 0 -> loss 0
    assert losses.balanced_cross_entropy(logits, target_ignored).item() == 0.0


def test_normals_l1_normalises_prediction_and_divides_by_valid_pixels() -> None:
    pred = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [4.0, 2.0, 0.0]]).view(1, 3, 1, 3)
    target = torch.tensor([[0.0, 255.0, 0.0], [0.0, 255.0, 0.0], [1.0, 255.0, 0.0]]).view(1, 3, 1, 3)
    # pixel 0: normalised (0.6, 0, 0.8) vs (0, 0, 1): |0.6| + 0 + |0.2| = 0.8;
    # pixel 1 ignored (255), pixel 2 invalid (zero target vector)
    assert math.isclose(losses.normals_l1(pred, target).item(), 0.8, rel_tol=1e-6)


def test_hed_bce_weights_positives_095() -> None:
    logits = torch.zeros(1, 1, 1, 3)
    target = torch.tensor([[[[1.0, 0.0, 255.0]]]])
    expected = (0.95 * math.log(2) + 0.05 * math.log(2)) / 2
    assert math.isclose(losses.hed_bce(logits, target).item(), expected, rel_tol=1e-6)


def test_depth_l1_skips_invalid_and_padding() -> None:
    pred = torch.tensor([1.0, 2.0, 5.0, 7.0]).view(1, 1, 1, 4)
    target = torch.tensor([1.5, 0.0, 4.0, 255.0]).view(1, 1, 1, 4)
    assert math.isclose(losses.depth_l1(pred, target).item(), (0.5 + 1.0) / 2, rel_tol=1e-6)


def test_losses_are_differentiable() -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    losses.cross_entropy(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
