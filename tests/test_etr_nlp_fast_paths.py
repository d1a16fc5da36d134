"""The fast CPU formulations of ETR-NLP's layers compute what the plain PyTorch layers compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polytask.models.etr_nlp.layers import RoutedConv
from polytask.models.etr_nlp.nlp import PointwiseMix, pointwise_blocks
from polytask.models.etr_nlp.primitives import FixedPool
from polytask.models.etr_nlp.stacked_batch import TaskRouter


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 9), (8, 8)])
def test_fixed_pools_equal_pytorch_pooling(stride: int, size: tuple[int, int]) -> None:
    x = torch.randn(2, 5, *size, dtype=torch.float64, requires_grad=True)
    reference = {
        "avg": lambda t: F.avg_pool2d(t, 3, stride, 1, count_include_pad=False),
        "max": lambda t: F.max_pool2d(t, 3, stride, 1),
    }
    for mode, pool in reference.items():
        y, expected = FixedPool(mode, stride)(x), pool(x)
        assert y.shape == expected.shape == (2, 5, -(-size[0] // stride), -(-size[1] // stride))
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        grad_out = torch.randn_like(expected)
        (grad,) = torch.autograd.grad(y, x, grad_out)
        (expected_grad,) = torch.autograd.grad(expected, x, grad_out)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("size", [(5, 3), (1, 2)], ids=["per-image-products", "images-side-by-side"])
def test_pointwise_mix_equals_grouped_convolution(bias: bool, size: tuple[int, int]) -> None:
    """Both formulations of :func:`pointwise_blocks` (chosen by the map size) equal a grouped 1x1 convolution."""
    torch.manual_seed(0)
    mix = PointwiseMix(48, 32, groups=2, bias=bias).double()
    conv = nn.Conv2d(48, 32, 1, groups=2, bias=bias).double()
    conv.load_state_dict(mix.state_dict())
    x = torch.randn(4, 48, *size, dtype=torch.float64, requires_grad=True)
    y, expected = mix(x), conv(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(expected)
    grads = torch.autograd.grad(y, [x, *mix.parameters()], grad_out)
    expected_grads = torch.autograd.grad(expected, [x, *conv.parameters()], grad_out)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(6, 6), (1, 1)])
def test_pointwise_blocks_do_not_depend_on_the_other_blocks(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 2, 24, 24), torch.randn(3, 48)
    x = torch.randn(3 * 2, 48, *size)
    stacked = pointwise_blocks(x, weight, bias)
    for i in range(3):
        alone = pointwise_blocks(x[2 * i : 2 * i + 2], weight[i : i + 1], bias[i : i + 1])
        torch.testing.assert_close(stacked[2 * i : 2 * i + 2], alone, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_joint_mix_equals_separate_shared_and_task_mixes(bias: bool) -> None:
    """One product over stacked shared + task weights gives the two separate mixes' outputs and gradients."""
    torch.manual_seed(0)
    router = TaskRouter(3)
    layer = RoutedConv(router, 8, 16, bias=bias, gamma=0.75, task_branch="nlp").double()
    assert layer.shared is not None and layer.task_convs is not None
    assert layer.shared.mix.groups == layer.task_convs[0].groups == 4
    x = torch.randn(2 * 2, 8, 6, 6, dtype=torch.float64)
    grad_out = torch.randn(4, 16, 6, 6, dtype=torch.float64)
    with router.route([2, 0]):
        joint = layer(x)
        joint.backward(grad_out)
        grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
        layer.zero_grad()
        responses = layer.shared.responses(x)
        separate = torch.cat([layer.shared.mix(responses), layer.task_forward(responses)], dim=1)
        separate.backward(grad_out)
    torch.testing.assert_close(joint, separate, rtol=1e-12, atol=1e-12)
    assert set(grads) == {name for name, p in layer.named_parameters() if p.grad is not None}
    assert "task_convs.1.weight" not in grads
    for name, p in layer.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-12)
    with router.route([2]):
        alone = layer(x[:2])
    torch.testing.assert_close(alone, joint[:2], rtol=0, atol=0)
