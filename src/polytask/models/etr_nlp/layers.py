"""Task-routed layers: the ETR(-NLP) convolution, per-task batch norm, per-task channel masks.

Every layer reads the active tasks from a shared :class:`~polytask.models.etr_nlp.router.TaskRouter`
and takes inputs in the stacked-batch layout ``(n B, C, H, W)`` (task blocks along the batch).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from polytask.models.etr_nlp.nlp import NLPBlock, NLPOptions
from polytask.models.etr_nlp.primitives import derive_seed
from polytask.models.etr_nlp.router import TaskRouter, blocks_to_channels, channels_to_blocks

SharedBranch = Literal["nlp", "conv"]


def shared_width(out_channels: int, gamma: float) -> int:
    """Shared output channels ``round(gamma * C_out)`` of a routed convolution."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    return round(gamma * out_channels)


class RoutedConv(nn.Module):
    """Explicit task routing of one convolution ``C_in -> C_out``: ``y = cat([shared(x), conv_t(x)])``.

    The first ``C_s = round(gamma C_out)`` output channels come from the shared branch, used by
    every task: an :class:`NLPBlock` (``shared_branch="nlp"``, ETR-NLP) or an ordinary
    learnable convolution (``"conv"``, ETR without NLP). The other ``C_out - C_s`` come from the
    active task's own learnable convolution. Both branches have the kernel, stride and dilation
    of the convolution they replace ("same" padding); the NLP applies its primitives, then the
    stride. In the stacked layout the task convolutions of ``n`` tasks run as one grouped
    convolution with ``n`` groups.

    Args:
        router: the network's task router (``T = router.num_tasks`` task convolutions).
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: odd kernel size ``k`` of the task (and learnable shared) convolution.
        stride: output stride.
        dilation: dilation of the task (and learnable shared) convolution.
        bias: give every branch a bias.
        gamma: sharing ratio.
        shared_branch: ``"nlp"`` or ``"conv"``.
        nlp: NLP options; a 1x1 convolution (``k = 1``) uses ``nlp.pointwise_primitives``.
        seed: seed of the primitives.
    """

    def __init__(
        self,
        router: TaskRouter,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = False,
        gamma: float = 0.9,
        shared_branch: SharedBranch = "nlp",
        nlp: NLPOptions = NLPOptions(),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        if shared_branch not in ("nlp", "conv"):
            raise ValueError(f"shared_branch must be 'nlp' or 'conv', got {shared_branch!r}")
        self.router = router
        self.out_channels = out_channels
        self.shared_channels = shared_width(out_channels, gamma)
        self.task_channels = out_channels - self.shared_channels
        padding = dilation * (kernel_size - 1) // 2
        self.shared: nn.Module | None = None
        if self.shared_channels and shared_branch == "nlp":
            primitives = nlp.primitives if kernel_size > 1 else nlp.pointwise_primitives
            self.shared = NLPBlock(
                in_channels, self.shared_channels, primitives, stride, nlp.groups, nlp.sparsity, nlp.noise_level, bias, seed
            )
        elif self.shared_channels:
            self.shared = nn.Conv2d(in_channels, self.shared_channels, kernel_size, stride, padding, dilation, bias=bias)
        self.task_convs: nn.ModuleList | None = None
        if self.task_channels:
            self.task_convs = nn.ModuleList(
                nn.Conv2d(in_channels, self.task_channels, kernel_size, stride, padding, dilation, bias=bias)
                for _ in range(router.num_tasks)
            )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        router: TaskRouter,
        gamma: float,
        shared_branch: SharedBranch,
        nlp: NLPOptions,
        seed: int,
    ) -> RoutedConv:
        """A routed replacement of ``conv`` (same channels, kernel, stride, dilation, bias; fresh weights).

        Raises:
            ValueError: ``conv`` is grouped, non-square, not "same"-padded or not zero-padded.
        """
        k, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        same = (k, k) == conv.kernel_size and (stride, stride) == conv.stride and (dilation, dilation) == conv.dilation
        padding_ok = conv.padding == (dilation * (k - 1) // 2,) * 2 and conv.padding_mode == "zeros"
        if conv.groups != 1 or not same or not padding_ok:
            raise ValueError(f"cannot route {conv}: only ungrouped, square, zero 'same'-padded convolutions are supported")
        return cls(
            router, conv.in_channels, conv.out_channels, k, stride, dilation, conv.bias is not None,
            gamma, shared_branch, nlp, seed,
        )

    def task_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Task branch on stacked blocks: ``(n B, C_in, H, W)`` -> ``(n B, C_out - C_s, H', W')``."""
        assert self.task_convs is not None
        tasks = self.router.active
        if len(tasks) == 1:
            return self.task_convs[tasks[0]](x)
        convs = [self.task_convs[t] for t in tasks]
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias for c in convs]) if convs[0].bias is not None else None
        first = convs[0]
        y = F.conv2d(blocks_to_channels(x, len(tasks)), weight, bias, first.stride, first.padding, first.dilation, len(tasks))
        return channels_to_blocks(y, len(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n B, C_in, H, W)`` -> ``(n B, C_out, ceil(H / s), ceil(W / s))``: shared channels first."""
        parts = []
        if self.shared is not None:
            parts.append(self.shared(x))
        if self.task_convs is not None:
            parts.append(self.task_forward(x))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class TaskBatchNorm(nn.Module):
    """Batch norm with one set of affine parameters and running statistics per task.

    In the stacked layout, the statistics of each task block are computed over that block
    only, so a batched pass normalises every task exactly as its per-task pass does.

    Args:
        router: the network's task router.
        num_features: channels ``C``.
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d`` (``momentum`` must be a float);
            without running statistics the batch statistics are used in evaluation too.
    """

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None

    def __init__(
        self,
        router: TaskRouter,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        if momentum is None:
            raise ValueError("TaskBatchNorm needs a float momentum (cumulative averaging is not supported)")
        self.router = router
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        num_tasks = router.num_tasks
        self.weight = nn.ParameterList(nn.Parameter(torch.ones(num_features)) for _ in range(num_tasks)) if affine else None
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(num_features)) for _ in range(num_tasks)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_tasks, num_features))
            self.register_buffer("running_var", torch.ones(num_tasks, num_features))
            self.register_buffer("num_batches_tracked", torch.zeros(num_tasks, dtype=torch.long))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, router: TaskRouter) -> TaskBatchNorm:
        """Per-task copies of ``bn`` (its settings, affine values and running statistics)."""
        out = cls(router, bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        with torch.no_grad():
            for t in range(router.num_tasks):
                if bn.affine and out.weight is not None and out.bias is not None:
                    out.weight[t].copy_(bn.weight)
                    out.bias[t].copy_(bn.bias)
                if bn.track_running_stats and out.running_mean is not None and out.running_var is not None:
                    out.running_mean[t].copy_(bn.running_mean)
                    out.running_var[t].copy_(bn.running_var)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n B, C, *S)`` -> same shape, each task block normalised with its task's parameters."""
        tasks = self.router.active
        n = len(tasks)
        index = torch.tensor(tasks, device=x.device)
        weight = torch.cat([self.weight[t] for t in tasks]) if self.weight is not None else None
        bias = torch.cat([self.bias[t] for t in tasks]) if self.bias is not None else None
        mean = var = None
        if self.running_mean is not None and self.running_var is not None:
            mean, var = self.running_mean[index].flatten(), self.running_var[index].flatten()
        use_batch_stats = self.training or mean is None
        y = F.batch_norm(blocks_to_channels(x, n), mean, var, weight, bias, use_batch_stats, self.momentum, self.eps)
        if self.training and mean is not None and var is not None:
            assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
            self.running_mean[index] = mean.view(n, -1)
            self.running_var[index] = var.view(n, -1)
            self.num_batches_tracked[index] += 1
        return channels_to_blocks(y, n)


class TaskChannelMask(nn.Module):
    """Task Routing: a fixed random binary channel mask per task (a seeded buffer).

    Task ``t`` keeps ``max(1, round(active_ratio C))`` channels drawn at random and zeroes the rest.

    Args:
        router: the network's task router.
        channels: ``C``.
        active_ratio: fraction of channels each task keeps.
        seed: seed of the masks.
    """

    mask: torch.Tensor

    def __init__(self, router: TaskRouter, channels: int, active_ratio: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < active_ratio <= 1.0:
            raise ValueError(f"active_ratio must lie in (0, 1], got {active_ratio}")
        self.router = router
        active = max(1, round(active_ratio * channels))
        masks = torch.zeros(router.num_tasks, channels)
        for t in range(router.num_tasks):
            generator = torch.Generator().manual_seed(derive_seed(seed, t))
            masks[t, torch.randperm(channels, generator=generator)[:active]] = 1.0
        self.register_buffer("mask", masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n B, C, *S)`` -> same shape, channels of block ``i`` multiplied by the mask of ``tasks[i]``."""
        tasks = self.router.active
        n, (nb, c, *spatial) = len(tasks), x.shape
        mask = self.mask[list(tasks)].to(x.dtype).view(n, 1, c, *([1] * len(spatial)))
        return (x.reshape(n, nb // n, c, *spatial) * mask).reshape(x.shape)


class ETRNLPModule(nn.Sequential):
    """The ETR-NLP module: ``ReLU(TaskBN(cat([NLP(x), Conv3x3_t(x)])))``, ``C_in -> C_out``.

    Args:
        router: the network's task router.
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        stride: output stride (primitives then stride; the task branch uses the same stride).
        gamma: sharing ratio.
        nlp: NLP options.
        seed: seed of the primitives.
    """

    def __init__(
        self,
        router: TaskRouter,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        gamma: float = 0.9,
        nlp: NLPOptions = NLPOptions(),
        seed: int = 0,
    ) -> None:
        super().__init__(
            RoutedConv(router, in_channels, out_channels, 3, stride, 1, False, gamma, "nlp", nlp, seed),
            TaskBatchNorm(router, out_channels),
            nn.ReLU(inplace=True),
        )
