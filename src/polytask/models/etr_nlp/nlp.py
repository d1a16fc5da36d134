"""The NLP block: frozen primitives recombined by a learnable group-wise 1x1 convolution."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from polytask.models.etr_nlp.primitives import DEFAULT_PRIMITIVES, POINTWISE_PRIMITIVES, build_primitive, derive_seed


@dataclass(frozen=True)
class NLPOptions:
    """The configuration of every NLP block of a network.

    Attributes:
        primitives: primitive names of the blocks that replace k x k convolutions (k > 1).
        pointwise_primitives: primitive names of the blocks that replace 1x1 convolutions
            (only pointwise primitives keep a 1x1 convolution's receptive field).
        groups: groups of the 1x1 mix; ``None`` uses ``gcd(C_in, C_shared)``, an integer ``g``
            uses ``gcd(g, C_in, C_shared)`` (the largest valid value not above ``g``).
        sparsity: fraction of non-zero weights of the local binary convolution.
        noise_level: half-width of the uniform perturbation noise.
    """

    primitives: tuple[str, ...] = DEFAULT_PRIMITIVES
    pointwise_primitives: tuple[str, ...] = ("identity",)
    groups: int | None = None
    sparsity: float = 0.5
    noise_level: float = 0.1

    def __post_init__(self) -> None:
        if not self.primitives or not self.pointwise_primitives:
            raise ValueError("an NLP block needs at least one primitive")
        spatial = sorted(set(self.pointwise_primitives) - POINTWISE_PRIMITIVES)
        if spatial:
            raise ValueError(f"pointwise_primitives {spatial} are not pointwise; choose from {sorted(POINTWISE_PRIMITIVES)}")
        if self.groups is not None and self.groups < 1:
            raise ValueError(f"groups must be >= 1 or None, got {self.groups}")


class PointwiseMix(nn.Conv2d):
    """A grouped 1x1 convolution computed as ``g`` matrix products per image.

    The parameters and their initialisation are ``nn.Conv2d``'s (``weight`` ``(C_out, C_in / g,
    1, 1)``); only the arithmetic differs: one batched matrix product, whose backward is also
    matrix products, where oneDNN's grouped-convolution backward is many times slower than its
    forward on CPU.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, 1, groups=groups, bias=bias)

    def grouped_weight(self) -> torch.Tensor:
        """The weight as ``(g, C_out / g, C_in / g)`` matrices."""
        g = self.groups
        return self.weight.view(g, self.out_channels // g, self.in_channels // g)

    def forward_blocks(self, x: torch.Tensor, blocks: int, grouped_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The mix of ``x`` taken as ``blocks`` equal batch blocks: ``(n B, C_in, H, W)`` -> ``(n B, C_out, H, W)``.

        Each block is computed as if it came alone (:func:`pointwise_blocks`), so a task's
        images get the same result whether other tasks' blocks are stacked with them or not.
        ``grouped_weight``: :meth:`grouped_weight` with its columns in the order of ``x``'s
        channels, where that is not the weight's own (:meth:`NLPBlock.mix_responses`).
        """
        weight = self.grouped_weight() if grouped_weight is None else grouped_weight
        weight = weight.unsqueeze(0).expand(blocks, -1, -1, -1)
        bias = None if self.bias is None else self.bias.unsqueeze(0).expand(blocks, -1)
        return pointwise_blocks(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, H, W)``."""
        return self.forward_blocks(x, 1)


def onednn_mixes(x: torch.Tensor) -> bool:
    """True where the mixes of :func:`pointwise_blocks` on channels-last tensors run as oneDNN 1x1
    convolutions: float32 tensors on a CPU with oneDNN.

    On the CPU, PyTorch's matrix products go to MKL, which ran the mixes at 64-76 GFLOP/s on the
    AMD core of benchmarks/RESULTS.md ("the arithmetic floor") while oneDNN's 1x1 convolution in
    channels-last memory ran them at 150-215 GFLOP/s forward and for the input gradient. Where
    this holds, a routed network with NLP blocks and NLP task branches runs in channels-last
    memory (:meth:`~polytask.models.etr_nlp.RoutedNet.forward_tasks`), and its mixes take this path.
    """
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class _OneDnnBlocks(torch.autograd.Function):
    """Block ``k`` of ``x`` through the grouped 1x1 weight ``weight[k]`` and bias ``bias[k]``, as oneDNN
    convolutions in channels-last memory.

    Forward: one oneDNN convolution per block, the bias added by the convolution. Backward: the
    input gradient is the 1x1 convolution of the output gradient with each group's transposed
    matrix (the same kernel as the forward); the weight gradient is one matrix product per block
    and group over the block's pixels; the bias gradient the sum of the block's output gradient.
    Each block is its own calls, so a block's result does not depend on the other blocks.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, g, o, i = weight.shape
        b = x.shape[0] // n
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        blocks = [
            _conv1x1(x[k * b : (k + 1) * b], weight[k].reshape(g * o, i, 1, 1), g, None if bias is None else bias[k])
            for k in range(n)
        ]
        return blocks[0] if n == 1 else torch.cat(blocks)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        n, g, o, i = weight.shape
        nb, _, h, w = x.shape
        b = nb // n
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            transposed = weight.transpose(2, 3).reshape(n, g * i, o, 1, 1).contiguous()
            blocks = [_conv1x1(grad[k * b : (k + 1) * b], transposed[k], g) for k in range(n)]
            grad_x = blocks[0] if n == 1 else torch.cat(blocks)
        if ctx.needs_input_grad[1]:
            # channels-last rows: (pixels, g, O) and (pixels, g, I) per block, read in place
            grad_rows = grad.permute(0, 2, 3, 1).reshape(n, b * h * w, g, o)
            x_rows = x.permute(0, 2, 3, 1).reshape(n, b * h * w, g, i)
            grad_weight = torch.stack([_weight_grad(grad_rows[k], x_rows[k]) for k in range(n)])
        if ctx.needs_input_grad[2]:
            grad_bias = grad.view(n, b, g * o, h, w).sum((1, 3, 4))
        return grad_x, grad_weight, grad_bias


def _weight_grad(grad_rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
    """The grouped 1x1 weight's gradient from channels-last rows: ``(P, g, O)`` and ``(P, g, I)`` -> ``(g, O, I)``.

    One group (``g = 1``) runs as oneDNN's matrix product (``mkldnn::_linear_pointwise``, which
    reads both operands in place): 1.5-2x MKL's rate on the AMD core of benchmarks/RESULTS.md.
    Several groups of at least :data:`ONEDNN_GROUP_ROWS` rows take one oneDNN product per group on
    dense copies of its rows (oneDNN's product falls to a slow path when a group's rows are
    strided); fewer rows take ``torch.bmm``, which beat the copies there. So does a backward that
    ``torch.compile`` traces: its compiler lowers oneDNN's product only for a constant weight.
    """
    groups, rows = grad_rows.shape[1:]
    if _ONEDNN_LINEAR is None or torch.compiler.is_compiling() or (groups > 1 and rows < ONEDNN_GROUP_ROWS):
        return torch.bmm(grad_rows.permute(1, 2, 0), x_rows.permute(1, 0, 2))
    # a single group's rows are dense already: contiguous() copies only for several groups
    return torch.stack([
        _ONEDNN_LINEAR(grad_rows[:, j].contiguous().t(), x_rows[:, j].contiguous().t(), None, "none", [], "")
        for j in range(groups)
    ])


ONEDNN_GROUP_ROWS = 64
"""Output rows per group from which a mix of several groups takes its weight gradient from oneDNN's
product on dense copies (:func:`_weight_grad`). With the NYUv2 SegNet's shapes that ran at 1.3-1.7x
``torch.bmm``'s speed with 128 rows and 0.75-1.0x with 32 (``benchmarks/etr_nlp_alternatives.py``,
two runs); the threshold lies between the two."""


_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_ONEDNN_CONVOLUTION = torch.ops.mkldnn._convolution_pointwise.default if torch.backends.mkldnn.is_available() else None


def _conv1x1(x: torch.Tensor, weight: torch.Tensor, groups: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's 1x1 convolution: ``(B, g I, H, W)`` with ``weight`` ``(g O, I, 1, 1)`` and ``bias`` ``(g O,)`` -> ``(B, g O, H, W)``.

    Called directly: ``F.conv2d`` hands a 1x1 convolution on one thread to MKL's matrix product.
    ``mkldnn::_convolution_pointwise`` runs oneDNN's convolution as ``torch.mkldnn_convolution``
    does (equal outputs, same speed in benchmarks/RESULTS.md) and, unlike it, has a shape
    function, so ``torch.compile`` can trace it.
    """
    return _ONEDNN_CONVOLUTION(x, weight, bias, [0, 0], [1, 1], [1, 1], groups, "none", [], "")


def pointwise_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A grouped 1x1 convolution per batch block: block ``i`` of ``x`` through ``weight[i]``.

    Args:
        x: ``(n B, g I, H, W)``: ``n`` blocks of ``B`` images.
        weight: ``(n, g, O, I)``: ``g`` groups of ``O x I`` matrices per block.
        bias: ``(n, g O)`` or ``None``.

    Returns:
        ``(n B, g O, H, W)``, output channel ``j O + o`` from group ``j``.

    A channels-last ``x`` takes oneDNN 1x1 convolutions where :func:`onednn_mixes` holds (the
    output is channels-last too). Otherwise large maps (``H W >= O I / (O + I)``) take one
    ``O x I`` by ``I x H W`` product per image and group, reading ``x`` in place; small maps put
    the images side by side, one ``O x I`` by ``I x B H W`` product per block and group (rather
    than copying the weight for every image). The choice depends on the shapes of one image
    only, and each block is its own calls, so a block's result does not depend on the other blocks.
    """
    n, g, o, i = weight.shape
    nb, _, h, w = x.shape
    b, weight = nb // n, weight.to(x.dtype)
    if is_channels_last(x) and onednn_mixes(x):
        return _OneDnnBlocks.apply(x, weight, None if bias is None else bias.to(x.dtype))
    if h * w * (o + i) >= o * i:
        y = torch.matmul(weight.unsqueeze(1), x.reshape(n, b, g, i, h * w))
    else:
        # one product per block on fresh (aligned) copies: the matrix kernels may sum in another
        # order for a batch of blocks or for operands at another memory alignment
        blocks = [
            torch.matmul(weight[k].clone(), x[k * b : (k + 1) * b].reshape(b, g, i, h * w).permute(1, 2, 0, 3).reshape(g, i, -1))
            for k in range(n)
        ]
        y = torch.stack(blocks).view(n, g, o, b, h * w).permute(0, 3, 1, 2, 4)
    if bias is not None:
        y = y + bias.to(x.dtype).view(n, 1, g, o, 1)
    return y.reshape(nb, g * o, h, w)


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-d tensor laid out channels-last and not also contiguous (the two coincide when ``C`` or ``H W`` is 1)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def mix_groups(in_channels: int, out_channels: int, groups: int | None) -> int:
    """Groups of the 1x1 mix from ``C_in`` inputs (k responses each) to ``out_channels`` (see :class:`NLPOptions`)."""
    limit = math.gcd(in_channels, out_channels)
    return limit if groups is None else math.gcd(groups, limit)


class NLPBlock(nn.Module):
    """``C_in -> C_out``: k frozen primitives, channel shuffle, learnable group-wise 1x1 mix.

    ``z = shuffle(cat([p_1(x), ..., p_k(x)]))`` puts the k responses of input channel ``c``
    at channels ``c k .. c k + k - 1``; ``y = W z`` with a 1x1 convolution of ``g`` groups, so
    group ``i`` mixes the responses of input channels ``i C_in / g .. (i + 1) C_in / g - 1``
    into output channels ``i C_out / g .. (i + 1) C_out / g - 1``. The mix is the block's only
    learnable weight.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        primitives: primitive names (k of them).
        stride: output stride of every primitive.
        groups: groups of the mix (see :func:`mix_groups`).
        sparsity: local binary sparsity.
        noise_level: perturbation half-width.
        bias: give the mix a bias.
        seed: seed of the primitives (each draws from ``derive_seed(seed, position, name)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        primitives: Sequence[str] = DEFAULT_PRIMITIVES,
        stride: int = 1,
        groups: int | None = None,
        sparsity: float = 0.5,
        noise_level: float = 0.1,
        bias: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.primitives = nn.ModuleList(
            build_primitive(name, in_channels, stride, derive_seed(seed, i, name), sparsity, noise_level)
            for i, name in enumerate(primitives)
        )
        k = len(self.primitives)
        self.mix = PointwiseMix(k * in_channels, out_channels, mix_groups(in_channels, out_channels, groups), bias)
        self.response_run = in_channels // self.mix.groups
        """Input channels per run of the channels-last responses (see :meth:`responses`); every mix
        reading them must have groups dividing ``C_in / response_run``."""

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """Shuffled frozen responses: ``(N, C_in, H, W)`` -> ``(N, k C_in, ceil(H / s), ceil(W / s))``.

        Channel ``c k + j`` is ``p_j(x)[:, c]``; the mix (and the task mixes of a
        :class:`~polytask.models.etr_nlp.layers.RoutedConv` with ``task_branch="nlp"``) read this tensor.

        A channels-last ``x`` (and responses larger than 1x1) gives channels-last responses in
        another channel order, one copy of each response's channel runs instead of a channel-by-
        channel interleave (12x faster to write at 64 channels, 288x384): the input channels in
        runs of ``r = response_run``, and per run the ``k`` responses one after the other, so
        channel ``(c // r) k r + j r + c % r`` is ``p_j(x)[:, c]``. The mixes take their weight
        columns in that order (:meth:`mix_weight`).
        """
        outputs = [p(x) for p in self.primitives]
        if is_channels_last(x) and outputs[0].shape[-2] * outputs[0].shape[-1] > 1:
            rows = [o.permute(0, 2, 3, 1) for o in outputs]
            n, h, w, c = rows[0].shape
            runs = torch.stack([r.reshape(n, h, w, c // self.response_run, self.response_run) for r in rows], dim=4)
            return runs.flatten(3).permute(0, 3, 1, 2)
        # stacking on dim 2 is the concatenation followed by the channel shuffle
        return torch.stack(outputs, dim=2).flatten(1, 2)

    def mix_weight(self, weight: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """A mix's grouped weight ``(..., g, O, k C_in / g)`` with its columns in the channel order of ``responses``.

        Unchanged for the order ``c k + j``; for channels-last responses (see :meth:`responses`)
        the columns of each group are reordered from ``(run, channel in run, response)`` to
        ``(run, response, channel in run)``: one copy of the weight, whose gradient is the
        inverse permutation.
        """
        if not is_channels_last(responses):
            return weight
        k, run = len(self.primitives), self.response_run
        runs = weight.shape[-1] // (k * run)
        return weight.unflatten(-1, (runs, run, k)).transpose(-1, -2).flatten(-3)

    def mix_responses(self, responses: torch.Tensor, blocks: int = 1) -> torch.Tensor:
        """The block's own mix of its ``responses`` taken as ``blocks`` task blocks, in their channel order:
        ``(n B, k C_in, H', W')`` -> ``(n B, C_out, H', W')``."""
        return self.mix.forward_blocks(responses, blocks, self.mix_weight(self.mix.grouped_weight(), responses))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, ceil(H / s), ceil(W / s))``."""
        return self.mix_responses(self.responses(x))
