"""The fast CPU formulations of ETR-NLP's layers compute what the plain PyTorch layers compute."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import polytask.models.etr_nlp.net as net_module
import polytask.models.etr_nlp.nlp as nlp_module
from polytask.models.etr_nlp import RoutedSegNet
from polytask.models.etr_nlp.layers import RoutedConv, gather_channel_runs
from polytask.models.etr_nlp.nlp import NLPBlock, PointwiseMix, pointwise_blocks
from polytask.models.etr_nlp.primitives import FixedPool, frozen_depthwise_conv, random_conv_weight
from polytask.models.etr_nlp.stacked_batch import TaskRouter
from polytask.models.summary import count_flops
from polytask.tasks import build_task


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


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_frozen_depthwise_conv_equals_pytorch_convolution(stride: int, dilation: int, channels_last: bool) -> None:
    """Values and input gradients (stride 1: the flipped-kernel forward convolution) equal ``F.conv2d``'s; the gradient is itself differentiable."""
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = random_conv_weight(6, seed=3).double()
    y = frozen_depthwise_conv(x, weight, stride, dilation)
    expected = F.conv2d(x, weight, None, stride, dilation, dilation, 6)
    assert y.shape == expected.shape == (2, 6, -(-7 // stride), -(-9 // stride))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(y, x, grad_out, create_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, x, grad_out, create_graph=True)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(grad)
    (second,) = torch.autograd.grad((grad * probe).sum() + (y * y).sum(), x)
    (expected_second,) = torch.autograd.grad((expected_grad * probe).sum() + (expected * expected).sum(), x)
    torch.testing.assert_close(second, expected_second, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gather_channel_runs_equals_concatenated_slices(channels_last: bool) -> None:
    """Values, memory format and gradient of the runs' gather equal those of ``torch.cat`` of the slices."""
    y = torch.randn(2, 10, 3, 4, dtype=torch.float64)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    y.requires_grad_(True)
    runs = [(0, 4), (7, 9), (4, 7), (9, 10)]
    out = gather_channel_runs(y, runs)
    expected = torch.cat([y[:, a:b] for a, b in runs], dim=1)
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    grad_out = torch.randn_like(expected)
    (grad,) = torch.autograd.grad(out, y, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, y, grad_out)
    assert torch.equal(grad, expected_grad)
    assert grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    for bad in ([(0, 4), (4, 9)], [(0, 4), (3, 10)], [(0, 5), (4, 10)]):
        with pytest.raises(ValueError, match="do not permute the 10 channels"):
            gather_channel_runs(y, bad)


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


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this PyTorch build")


def _matmul_mixes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route every mix to the matrix-product formulation (the one float64 and GPUs run)."""
    monkeypatch.setattr(nlp_module, "onednn_mixes", lambda x: False)
    monkeypatch.setattr(net_module, "onednn_mixes", lambda x: False)


@needs_onednn
@pytest.mark.parametrize(
    ("blocks", "groups", "bias", "o"),
    [(1, 1, False, 5), (1, 2, True, 5), (3, 2, False, 5), (2, 1, True, 5), (2, 2, True, nlp_module.ONEDNN_GROUP_ROWS)],
)
def test_onednn_mixes_equal_the_matrix_products(
    monkeypatch: pytest.MonkeyPatch, blocks: int, groups: int, bias: bool, o: int
) -> None:
    i, b = 12, 2
    x = torch.randn(blocks * b, groups * i, 9, 11).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(blocks, groups, o, i, requires_grad=True)
    bias_t = torch.randn(blocks, groups * o, requires_grad=True) if bias else None
    grad_out = torch.randn(blocks * b, groups * o, 9, 11)

    def run() -> list[torch.Tensor]:
        xx = x.clone().requires_grad_()
        y = pointwise_blocks(xx, weight, bias_t)
        inputs = [xx, weight] + ([bias_t] if bias else [])
        return [y, *torch.autograd.grad(y, inputs, grad_out)]

    products: list[tuple[int, ...]] = []
    onednn_linear = nlp_module._ONEDNN_LINEAR
    assert onednn_linear is not None

    def counted(*args: object) -> torch.Tensor:
        products.append(tuple(args[0].shape))  # type: ignore[attr-defined]
        return onednn_linear(*args)

    monkeypatch.setattr(nlp_module, "_ONEDNN_LINEAR", counted)
    fast = run()
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    # one group, or groups of ONEDNN_GROUP_ROWS rows: the weight gradient is oneDNN's matrix product, one per block and group
    onednn = groups == 1 or o >= nlp_module.ONEDNN_GROUP_ROWS
    assert products == ([(o, b * 9 * 11)] * blocks * groups if onednn else [])
    _matmul_mixes(monkeypatch)
    reference = run()
    for got, expected in zip(fast, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_mixes_run_on_fake_tensors_for_torch_compile() -> None:
    # torch.compile traces the network on fake tensors; aten.mkldnn_convolution has no shape function there
    with FakeTensorMode():
        x = torch.randn(4, 2 * 12, 9, 11).contiguous(memory_format=torch.channels_last).requires_grad_()
        weight = torch.randn(2, 2, nlp_module.ONEDNN_GROUP_ROWS, 12, requires_grad=True)
        bias = torch.randn(2, 2 * nlp_module.ONEDNN_GROUP_ROWS, requires_grad=True)
        y = pointwise_blocks(x, weight, bias)
        grads = torch.autograd.grad(y.sum(), [x, weight, bias])
    assert y.shape == (4, 2 * nlp_module.ONEDNN_GROUP_ROWS, 9, 11) and y.is_contiguous(memory_format=torch.channels_last)
    assert [g.shape for g in grads] == [x.shape, weight.shape, bias.shape]


@needs_onednn
@pytest.mark.slow
def test_compiled_channels_last_network_equals_eager() -> None:
    torch.manual_seed(0)
    tasks = [build_task("semseg", num_classes=5), build_task("depth")]
    net = RoutedSegNet(tasks, filters=(8, 16, 16, 32, 32), routing="etr_nlp", running_stats=False, task_branch="nlp")
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(net)

    def step(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        net.zero_grad(set_to_none=True)
        out = model(x)
        sum(o.pow(2).mean() for o in out.values()).backward()
        return {k: v.detach() for k, v in out.items()}, [p.grad.clone() for p in net.parameters()]

    (eager_out, eager_grads), (out, grads) = step(net), step(compiled)
    with torch.no_grad():
        net.eval()
        eager_infer, infer = net(x), compiled(x)
    for name in eager_out:
        torch.testing.assert_close(out[name], eager_out[name], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(infer[name], eager_infer[name], rtol=1e-3, atol=1e-3)
    # against the largest gradient: batch statistics of 2x2 maps amplify rounding (eager float32 lies
    # 1e-3 of it from float64, compiled 5e-3: the compiler reorders the sums), and the biases before
    # batch norm have a zero gradient up to rounding
    scale = float(max(g.abs().max() for g in eager_grads))
    for got, expected in zip(grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=0.0, atol=2e-2 * scale)


@needs_onednn
@pytest.mark.parametrize("groups", [1, 2])
def test_onednn_mix_of_a_block_does_not_depend_on_the_other_blocks(groups: int) -> None:
    x = torch.randn(6, 8, 10, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(3, groups, 8 // groups, 8 // groups, requires_grad=True)
    grad_out = torch.randn(6, 8, 10, 10)
    y = pointwise_blocks(x, weight, None)
    grads = torch.autograd.grad(y, [x, weight], grad_out)
    for k in range(3):
        xk = x[2 * k : 2 * k + 2].detach().clone().requires_grad_()
        wk = weight[k : k + 1].detach().clone().requires_grad_()
        yk = pointwise_blocks(xk, wk, None)
        gx, gw = torch.autograd.grad(yk, [xk, wk], grad_out[2 * k : 2 * k + 2])
        assert torch.equal(yk, y[2 * k : 2 * k + 2])
        assert torch.equal(gx, grads[0][2 * k : 2 * k + 2]) and torch.equal(gw, grads[1][k : k + 1])


def test_conv_task_branch_stays_in_nchw_memory() -> None:
    """With convolution task branches the mixes stay matrix products (channels-last measured slower there)."""
    tasks = [build_task("semseg", num_classes=5), build_task("depth")]
    net = RoutedSegNet(tasks, filters=(8, 16, 16, 16, 16), routing="etr_nlp", task_branch="conv")
    features = []
    net.trunk.encoder_block[1].register_forward_hook(lambda module, inputs, output: features.append(output))
    net(torch.randn(2, 3, 32, 48))
    assert features and all(f.is_contiguous() for f in features)


@needs_onednn
def test_channels_last_network_is_as_accurate_as_the_matrix_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 RoutedSegNet with oneDNN mixes in channels-last memory against the same net in float64: outputs
    and gradients no further from float64 than twice the float32 matrix-product formulation's (batch
    statistics of 2 images make float32 gradients of this net a few percent off float64 either way)."""
    torch.manual_seed(0)
    tasks = [build_task("semseg", num_classes=5), build_task("depth")]
    net = RoutedSegNet(tasks, filters=(8, 16, 16, 16, 16), routing="etr_nlp", task_branch="nlp")
    images = torch.randn(2, 3, 32, 48)
    calls = []
    apply = nlp_module._OneDnnBlocks.apply
    monkeypatch.setattr(nlp_module._OneDnnBlocks, "apply", lambda *args: calls.append(1) or apply(*args))

    def step(model: nn.Module, inputs: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(inputs)
        sum(o.pow(2).mean() for o in out.values()).backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.detach().double() for k, v in out.items()}, grads

    exact = step(copy.deepcopy(net).double(), images.double())
    fast = step(net, images)
    # the stacked all-task step: one joint mix per routed convolution, every one in oneDNN
    assert len(calls) == sum(isinstance(m, RoutedConv) for m in net.modules()) == 26
    assert all(v.is_contiguous() for v in net(images).values())
    _matmul_mixes(monkeypatch)
    matmul = step(net, images)

    def error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
        """Relative error of all tensors together (Frobenius norms)."""
        diff = torch.stack([(got[k] - want[k]).norm() for k in want]).norm()
        return float(diff / torch.stack([v.norm() for v in want.values()]).norm())

    assert fast[1].keys() == exact[1].keys()
    for part, bound in ((0, 1e-4), (1, 0.1)):
        assert error(fast[part], exact[part]) < bound
        assert error(fast[part], exact[part]) <= 2 * error(matmul[part], exact[part]) + 1e-7


@needs_onednn
def test_flop_count_sees_the_onednn_mixes(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = [build_task("semseg", num_classes=5), build_task("depth")]
    net = RoutedSegNet(tasks, filters=(8, 16, 16, 16, 16), routing="etr_nlp", task_branch="nlp")
    onednn = count_flops(net, (32, 48))
    _matmul_mixes(monkeypatch)
    assert onednn == count_flops(net, (32, 48)) > 0


@needs_onednn
@pytest.mark.parametrize(("out_channels", "gamma", "stride"), [(12, 2 / 3, 1), (16, 0.5, 1), (16, 0.5, 2)])
def test_channels_last_responses_in_runs_equal_the_interleaved_order(out_channels: int, gamma: float, stride: int) -> None:
    """A routed convolution on channels-last input, with its responses in runs of input channels (the shared
    and the task mixes in separate groups, or one joint mix), against the interleaved order and the NCHW layers."""
    router = TaskRouter(2)
    conv = RoutedConv(router, 16, out_channels, stride=stride, gamma=gamma, task_branch="nlp", bias=True)
    assert isinstance(conv.shared, NLPBlock) and conv.shared.response_run > 1
    x = torch.randn(4, 16, 9, 11)
    grad_out = torch.randn(4, out_channels, -(-9 // stride), -(-11 // stride))
    params = list(conv.parameters())

    def run(inputs: torch.Tensor) -> list[torch.Tensor]:
        inputs = inputs.clone().requires_grad_()
        with router.route([0, 1]):
            y = conv(inputs)
        return [y, *torch.autograd.grad(y, [inputs, *params], grad_out)]

    in_runs = run(x.contiguous(memory_format=torch.channels_last))
    run_length = conv.shared.response_run
    conv.shared.response_run = 1  # runs of one channel: the interleaved order c k + j
    interleaved = run(x.contiguous(memory_format=torch.channels_last))
    conv.shared.response_run = run_length
    nchw = run(x)
    assert in_runs[0].is_contiguous(memory_format=torch.channels_last)
    for got, a, b in zip(in_runs, interleaved, nchw):
        torch.testing.assert_close(got, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, b, rtol=1e-5, atol=1e-5)
