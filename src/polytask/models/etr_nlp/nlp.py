"""The NLP block: frozen primitives recombined by a learnable group-wise 1x1 convolution."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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

    def forward_blocks(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        """The mix of ``x`` taken as ``blocks`` equal batch blocks: ``(n B, C_in, H, W)`` -> ``(n B, C_out, H, W)``.

        Each block is computed as if it came alone (:func:`pointwise_blocks`), so a task's
        images get the same result whether other tasks' blocks are stacked with them or not.
        """
        weight = self.grouped_weight().unsqueeze(0).expand(blocks, -1, -1, -1)
        bias = None if self.bias is None else self.bias.unsqueeze(0).expand(blocks, -1)
        return pointwise_blocks(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, H, W)``."""
        return self.forward_blocks(x, 1)


def pointwise_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A grouped 1x1 convolution per batch block: block ``i`` of ``x`` through ``weight[i]``.

    Args:
        x: ``(n B, g I, H, W)``: ``n`` blocks of ``B`` images.
        weight: ``(n, g, O, I)``: ``g`` groups of ``O x I`` matrices per block.
        bias: ``(n, g O)`` or ``None``.

    Returns:
        ``(n B, g O, H, W)``, output channel ``j O + o`` from group ``j``.

    Large maps (``H W >= O I / (O + I)``) take one ``O x I`` by ``I x H W`` product per image
    and group, reading ``x`` in place; small maps put the images side by side, one
    ``O x I`` by ``I x B H W`` product per block and group (rather than copying the weight
    for every image). The choice depends on the shapes of one image only, and each block is
    its own products, so a block's result does not depend on the other blocks.
    """
    n, g, o, i = weight.shape
    nb, _, h, w = x.shape
    b, weight = nb // n, weight.to(x.dtype)
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

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """Shuffled frozen responses: ``(N, C_in, H, W)`` -> ``(N, k C_in, ceil(H / s), ceil(W / s))``.

        Channel ``c k + j`` is ``p_j(x)[:, c]``; the mix (and the task mixes of a
        :class:`~polytask.models.etr_nlp.layers.RoutedConv` with ``task_branch="nlp"``) read this tensor.
        """
        # stacking on dim 2 is the concatenation followed by the channel shuffle
        return torch.stack([p(x) for p in self.primitives], dim=2).flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W)`` -> ``(N, C_out, ceil(H / s), ceil(W / s))``."""
        return self.mix(self.responses(x))
