"""Non-learnable primitives (NLPs): frozen operations ``(N, C, H, W) -> (N, C, ceil(H / s), ceil(W / s))``.

Every primitive keeps its fixed weights in buffers generated from a seed with a
``torch.Generator``: they are never parameters, never receive gradients, never change in
training, and travel in the ``state_dict`` so a checkpoint reproduces them exactly.

All primitives act per channel (convolutions are depthwise), are "same"-padded at stride 1,
and apply a stride ``s`` by evaluating at every ``s``-th position, which equals applying the
stride-1 primitive and keeping pixels ``0, s, 2s, ...``; the output size is ``ceil(H / s)``,
the size of a "same"-padded strided convolution.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_PRIMITIVES: tuple[str, ...] = ("local_binary", "dilated_random_conv", "avg_pool", "max_pool", "identity")
"""The default set (k = 5)."""


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that is a deterministic function of ``seed`` and ``keys`` (stable across runs)."""
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def local_binary_weight(channels: int, sparsity: float, seed: int) -> torch.Tensor:
    """Depthwise local-binary 3x3 weights ``(C, 1, 3, 3)`` in {-1, 0, +1}.

    Every channel gets exactly ``floor(sparsity * 9 + 0.5)`` (at least one) non-zero
    positions, chosen uniformly at random, each with a random sign (Local Binary CNNs).
    """
    if not 0.0 < sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in (0, 1], got {sparsity}")
    generator = _generator(seed)
    nonzero = max(1, math.floor(sparsity * 9 + 0.5))
    order = torch.rand(channels, 9, generator=generator).argsort(dim=1)
    signs = torch.randint(0, 2, (channels, 9), generator=generator).float() * 2 - 1
    weight = torch.where(order < nonzero, signs, torch.zeros_like(signs))
    return weight.view(channels, 1, 3, 3)


def random_conv_weight(channels: int, seed: int) -> torch.Tensor:
    """Depthwise 3x3 Kaiming-normal weights ``(C, 1, 3, 3)``: std ``sqrt(2 / 9)`` (fan-in 9, ReLU gain)."""
    return torch.randn(channels, 1, 3, 3, generator=_generator(seed)) * math.sqrt(2.0 / 9.0)


class _FrozenDepthwise(torch.autograd.Function):
    """A stride-1 depthwise 3x3 convolution of frozen weights whose input gradient is the forward
    convolution of the output gradient with the flipped kernel (the transposed convolution at
    stride 1, "same" padding), computed by the forward kernel: on a CPU, oneDNN's depthwise
    backward ran 1.3-2.3x (dilation 2: 8-19x) slower than its forward (benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.dilation = dilation
        return F.conv2d(x, weight, None, 1, dilation, dilation, x.shape[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return F.conv2d(grad, weight.flip(-1, -2), None, 1, ctx.dilation, ctx.dilation, grad.shape[1]), None, None


def frozen_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, dilation: int = 1) -> torch.Tensor:
    """Depthwise 3x3 convolution of fixed weights, padding ``dilation``: ``(N, C, H, W)`` -> ``(N, C, ceil(H / s), ceil(W / s))``.

    ``weight``: ``(C, 1, 3, 3)``, no gradient. At stride 1 the input gradient is the forward
    convolution with the flipped kernel (:class:`_FrozenDepthwise`); equal to PyTorch's
    convolution backward up to float rounding.
    """
    weight = weight.to(x.dtype)
    if stride == 1:
        return _FrozenDepthwise.apply(x, weight, dilation)
    return F.conv2d(x, weight, None, stride, dilation, dilation, x.shape[1])


class FrozenDepthwiseConv(nn.Module):
    """A frozen depthwise 3x3 convolution with "same" padding.

    Args:
        weight: ``(C, 1, 3, 3)`` fixed weights (stored as a buffer).
        stride: output stride.
        dilation: kernel dilation (padding equals it).
    """

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.stride = stride
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, ceil(H / s), ceil(W / s))``."""
        return frozen_depthwise_conv(x, self.weight, self.stride, self.dilation)


class FixedPerturbation(nn.Module):
    """Add a fixed noise mask drawn uniformly in ``[-level, level]`` (Perturbative NNs), then stride.

    The mask of an input of spatial size ``(H, W)`` is a ``(C, H, W)`` tensor generated from
    ``derive_seed(seed, H, W)``: a deterministic function of the seed and the size, created on
    first use at that size and cached. The seed is a buffer, so a checkpoint carries it and a
    loaded model draws the same masks.

    Args:
        channels: ``C``.
        seed: seed of the masks.
        level: half-width of the uniform noise.
        stride: output stride.
    """

    seed: torch.Tensor

    def __init__(self, channels: int, seed: int, level: float = 0.1, stride: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.level = level
        self.stride = stride
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self._masks: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = {}

    def mask(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The fixed ``(C, H, W)`` mask of inputs of size ``(height, width)``."""
        key = (height, width, device, dtype)
        if key not in self._masks:
            generator = _generator(derive_seed(int(self.seed), height, width))
            noise = (torch.rand(self.channels, height, width, generator=generator) * 2 - 1) * self.level
            self._masks[key] = noise.to(device=device, dtype=dtype)
        return self._masks[key]

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._masks.clear()
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, ceil(H / s), ceil(W / s))``."""
        y = x + self.mask(x.shape[-2], x.shape[-1], x.device, x.dtype)
        return y[..., :: self.stride, :: self.stride]


class FixedPool(nn.Module):
    """3x3 average or max pooling, padding 1 (average over the valid pixels only).

    Args:
        mode: ``"avg"`` or ``"max"``.
        stride: output stride.
    """

    def __init__(self, mode: str, stride: int = 1) -> None:
        super().__init__()
        if mode not in ("avg", "max"):
            raise ValueError(f"pool mode must be 'avg' or 'max', got {mode!r}")
        self.mode = mode
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, ceil(H / s), ceil(W / s))``.

        Both poolings avoid PyTorch's NCHW pooling kernels, which run several times slower on
        CPU at stride 1 than the equivalent below (``benchmarks/RESULTS.md``): the maximum runs
        in channels-last memory (where the kernel vectorises over channels; same values), the
        average is a depthwise 3x3 convolution of ones divided by the number of valid pixels
        (equal to ``avg_pool2d(..., count_include_pad=False)`` up to float rounding).
        """
        if self.mode == "max":
            return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, self.stride, 1)
        channels, (height, width) = x.shape[1], x.shape[-2:]
        total = frozen_depthwise_conv(x, x.new_ones(channels, 1, 3, 3), self.stride)
        count = F.conv2d(x.new_ones(1, 1, height, width), x.new_ones(1, 1, 3, 3), None, self.stride, 1)
        return total / count


class StridedIdentity(nn.Module):
    """``x`` itself, subsampled by the stride.

    Args:
        stride: output stride.
    """

    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, ceil(H / s), ceil(W / s))``."""
        return x[..., :: self.stride, :: self.stride]


PrimitiveFactory = Callable[[int, int, int, float, float], nn.Module]

PRIMITIVES: dict[str, PrimitiveFactory] = {
    "local_binary": lambda c, s, seed, sparsity, level: FrozenDepthwiseConv(local_binary_weight(c, sparsity, seed), s),
    "perturbation": lambda c, s, seed, sparsity, level: FixedPerturbation(c, seed, level, s),
    "random_conv": lambda c, s, seed, sparsity, level: FrozenDepthwiseConv(random_conv_weight(c, seed), s),
    "dilated_random_conv": lambda c, s, seed, sparsity, level: FrozenDepthwiseConv(random_conv_weight(c, seed), s, 2),
    "avg_pool": lambda c, s, seed, sparsity, level: FixedPool("avg", s),
    "max_pool": lambda c, s, seed, sparsity, level: FixedPool("max", s),
    "identity": lambda c, s, seed, sparsity, level: StridedIdentity(s),
}
"""Primitive name -> factory ``(channels, stride, seed, sparsity, noise_level) -> module``."""

POINTWISE_PRIMITIVES: frozenset[str] = frozenset({"perturbation", "identity"})
"""Primitives that look at one pixel only (allowed in place of 1x1 convolutions)."""


def build_primitive(
    name: str, channels: int, stride: int, seed: int, sparsity: float = 0.5, noise_level: float = 0.1
) -> nn.Module:
    """Build one frozen primitive by name (a key of :data:`PRIMITIVES`).

    Args:
        name: primitive name.
        channels: channels ``C`` of its input and output.
        stride: output stride.
        seed: seed of its fixed weights (unused by weightless primitives).
        sparsity: fraction of non-zero local-binary weights.
        noise_level: half-width of the perturbation noise.
    """
    if name not in PRIMITIVES:
        raise ValueError(f"unknown primitive {name!r}; known: {sorted(PRIMITIVES)}")
    return PRIMITIVES[name](channels, stride, seed, sparsity, noise_level)
