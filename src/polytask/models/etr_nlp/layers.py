"""Task-routed layers: the ETR(-NLP) convolution, per-task and shared batch norms, per-task channel masks.

Every layer reads the active tasks from a shared :class:`~polytask.models.etr_nlp.stacked_batch.TaskRouter`
and takes inputs in the stacked-batch layout ``(n B, C, H, W)`` (task blocks along the batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polytask.models.etr_nlp.nlp import NLPBlock, NLPOptions, PointwiseMix, mix_groups, pointwise_blocks
from polytask.models.etr_nlp.primitives import derive_seed
from polytask.models.etr_nlp.stacked_batch import TaskRouter, blocks_to_channels, channels_to_blocks

SharedBranch = Literal["nlp", "conv"]
TaskBranch = Literal["nlp", "conv"]


def shared_width(out_channels: int, gamma: float) -> int:
    """Shared output channels ``round(gamma * C_out)`` of a routed convolution."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    return round(gamma * out_channels)


class _ChannelRuns(torch.autograd.Function):
    """The channel runs ``y[:, a:b]`` of a permutation of ``y``'s channels, concatenated; the
    backward is the inverse permutation, gathered the same way (one copy, no zero-filled
    gradient per slice and no sum of them)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
        ctx.runs = runs
        return _cat_runs(y, runs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        offsets, start = [], 0
        for a, b in ctx.runs:
            offsets.append((a, start, start + b - a))
            start += b - a
        return _cat_runs(grad, tuple((lo, hi) for _, lo, hi in sorted(offsets))), None


def _cat_runs(y: torch.Tensor, runs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    # slices concatenated keep y's memory format (channels-last stays channels-last; a reshape would not)
    return torch.cat([y[:, a:b] for a, b in runs], dim=1)


def gather_channel_runs(y: torch.Tensor, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``cat([y[:, a:b] for a, b in runs], dim=1)`` for runs that permute all of ``y``'s channels: ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    Keeps ``y``'s memory format; its gradient is one gather of the output gradient's runs.

    Raises:
        ValueError: the runs do not cover each channel of ``y`` exactly once.
    """
    covered = sorted(runs)
    if [a for a, _ in covered] != [0, *(b for _, b in covered[:-1])] or covered[-1][1] != y.shape[1]:
        raise ValueError(f"channel runs {list(runs)} do not permute the {y.shape[1]} channels")
    return _ChannelRuns.apply(y, tuple(runs))


class RoutedConv(nn.Module):
    """Explicit task routing of one convolution ``C_in -> C_out``: ``y = cat([shared(x), specific_t(x)])``.

    The first ``C_s = round(gamma C_out)`` output channels come from the shared branch, used by
    every task: an :class:`NLPBlock` (``shared_branch="nlp"``, ETR-NLP) or an ordinary
    learnable convolution (``"conv"``, ETR without NLP). The other ``C_t = C_out - C_s`` come
    from the active task's own branch (``task_convs[t]``):

    * ``task_branch="conv"``: a learnable convolution of ``x`` with the kernel, stride and
      dilation of the replaced convolution;
    * ``task_branch="nlp"``: a learnable 1x1 convolution of the shared block's frozen primitive
      responses (``NLPBlock.responses``, ``(N, k C_in, H', W')``), grouped by the rule of the
      shared mix (:func:`mix_groups` of ``C_in`` and ``C_t``); the primitives run once for the
      shared branch and every task.

    Both branches use "same" padding; the NLP applies its primitives, then the stride. In the
    stacked layout the task branches of ``n`` tasks run as one grouped convolution (``n`` times
    the groups of one task branch).

    Args:
        router: the network's task router (``T = router.num_tasks`` task branches).
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
        task_branch: ``"conv"`` or ``"nlp"`` (needs ``shared_branch="nlp"`` and ``C_s > 0``).
        mix_gamma: the shared mix takes the groups it would have at this sharing ratio,
            ``mix_groups(C_in, round(mix_gamma C_out), nlp.groups)`` (reduced to a divisor of
            ``C_s``); ``None`` = ``gamma``. The NLP-only baseline (``gamma = 1``) passes the
            ETR-NLP arm's ratio so that both mix the primitive responses in the same groups.

    Raises:
        ValueError: an even kernel, an unknown branch, or ``task_branch="nlp"`` without a shared NLP block.
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
        task_branch: TaskBranch = "conv",
        mix_gamma: float | None = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        if shared_branch not in ("nlp", "conv"):
            raise ValueError(f"shared_branch must be 'nlp' or 'conv', got {shared_branch!r}")
        if task_branch not in ("nlp", "conv"):
            raise ValueError(f"task_branch must be 'nlp' or 'conv', got {task_branch!r}")
        self.router = router
        self.out_channels = out_channels
        self.shared_channels = shared_width(out_channels, gamma)
        self.task_channels = out_channels - self.shared_channels
        self.task_branch = task_branch
        if task_branch == "nlp" and self.task_channels and (shared_branch != "nlp" or not self.shared_channels):
            raise ValueError(
                "task_branch='nlp' reads the shared NLP block's primitive responses: it needs shared_branch='nlp' "
                f"and at least one shared channel (gamma={gamma}, C_out={out_channels})"
            )
        padding = dilation * (kernel_size - 1) // 2
        self.shared: nn.Module | None = None
        if self.shared_channels and shared_branch == "nlp":
            primitives = nlp.primitives if kernel_size > 1 else nlp.pointwise_primitives
            groups = mix_groups(in_channels, shared_width(out_channels, gamma if mix_gamma is None else mix_gamma), nlp.groups)
            self.shared = NLPBlock(
                in_channels, self.shared_channels, primitives, stride, groups, nlp.sparsity, nlp.noise_level, bias, seed
            )
        elif self.shared_channels:
            self.shared = nn.Conv2d(in_channels, self.shared_channels, kernel_size, stride, padding, dilation, bias=bias)
        self.task_convs: nn.ModuleList | None = None
        if self.task_channels and task_branch == "nlp":
            assert isinstance(self.shared, NLPBlock)
            k = len(self.shared.primitives)
            groups = mix_groups(in_channels, self.task_channels, nlp.groups)
            self.task_convs = nn.ModuleList(
                PointwiseMix(k * in_channels, self.task_channels, groups, bias) for _ in range(router.num_tasks)
            )
            # runs of the channels-last responses that both the shared and the task mixes' groups cover
            self.shared.response_run = in_channels // math.lcm(self.shared.mix.groups, groups)
        elif self.task_channels:
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
        task_branch: TaskBranch = "conv",
        mix_gamma: float | None = None,
    ) -> RoutedConv:
        """A routed replacement of ``conv`` (same channels, kernel, stride, dilation, bias; fresh weights).

        ``gamma`` to ``mix_gamma`` are as in :class:`RoutedConv`.

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
            gamma, shared_branch, nlp, seed, task_branch, mix_gamma,
        )

    def task_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Task branches on stacked blocks: ``(n B, C, H, W)`` -> ``(n B, C_t, H', W')``.

        ``x`` is the layer input (``C = C_in``, ``task_branch="conv"``) or the shared block's
        primitive responses (``C = k C_in``, already strided, ``task_branch="nlp"``).
        """
        assert self.task_convs is not None
        tasks = self.router.active
        if self.task_branch == "nlp":
            assert isinstance(self.shared, NLPBlock)
            weight, bias = self._task_mixes(tasks)
            return pointwise_blocks(x, self.shared.mix_weight(weight, x), bias)
        if len(tasks) == 1:
            return self.task_convs[tasks[0]](x)
        convs = [self.task_convs[t] for t in tasks]
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias for c in convs]) if convs[0].bias is not None else None
        first, n = convs[0], len(tasks)
        y = F.conv2d(blocks_to_channels(x, n), weight, bias, first.stride, first.padding, first.dilation, n * first.groups)
        return channels_to_blocks(y, n)

    def _task_mixes(self, tasks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``nlp`` task branches of ``tasks`` as :func:`pointwise_blocks` takes them:
        weights ``(n, g, C_t / g, k C_in / g)`` and biases ``(n, C_t)`` (None without bias)."""
        assert self.task_convs is not None
        mixes: list[PointwiseMix] = [self.task_convs[t] for t in tasks]  # type: ignore[misc]
        weight = torch.stack([m.grouped_weight() for m in mixes])
        bias = torch.stack([m.bias for m in mixes]) if mixes[0].bias is not None else None  # type: ignore[misc]
        return weight, bias

    def joint_mix(self, responses: torch.Tensor) -> torch.Tensor:
        """Shared and task mixes of equal groups as one matrix product per image, task block and group.

        Each group's shared and task weights are stacked into one ``(C_s / g + C_t / g) x (k C_in / g)``
        matrix, so the responses are read once forward and their gradient written once backward
        (two separate mixes cost a second pass and a sum over a tensor ``k`` times the layer input).

        Args:
            responses: ``(n B, k C_in, H', W')``, the shared block's primitive responses.

        Returns:
            ``(n B, C_out, H', W')``, shared channels first, as the two separate mixes give.
        """
        assert isinstance(self.shared, NLPBlock)
        tasks = self.router.active
        shared = self.shared.mix
        n, g = len(tasks), shared.groups
        task_weight, task_bias = self._task_mixes(tasks)
        weight = torch.cat([shared.grouped_weight().expand(n, -1, -1, -1), task_weight], dim=2)
        weight = self.shared.mix_weight(weight, responses)
        bias = None
        if shared.bias is not None and task_bias is not None:
            # group-major like the weight rows: group j holds its shared, then its task channels
            bias = torch.cat([shared.bias.view(1, g, -1).expand(n, -1, -1), task_bias.view(n, g, -1)], dim=2).flatten(1)
        y = pointwise_blocks(responses, weight, bias)
        shared_rows, task_rows = self.shared_channels // g, self.task_channels // g
        rows = shared_rows + task_rows
        shared_runs = [(j * rows, j * rows + shared_rows) for j in range(g)]
        task_runs = [(j * rows + shared_rows, (j + 1) * rows) for j in range(g)]
        return gather_channel_runs(y, shared_runs + task_runs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n B, C_in, H, W)`` -> ``(n B, C_out, ceil(H / s), ceil(W / s))``: shared channels first."""
        if isinstance(self.shared, NLPBlock) and self.task_convs is not None:
            responses = self.shared.responses(x)
            if self.task_branch == "nlp" and self.shared.mix.groups == self.task_convs[0].groups:
                return self.joint_mix(responses)
            shared = self.shared.mix_responses(responses, len(self.router.active))
            return torch.cat([shared, self.task_forward(responses if self.task_branch == "nlp" else x)], dim=1)
        parts = []
        if self.shared is not None:
            parts.append(self.shared(x))
        if self.task_convs is not None:
            parts.append(self.task_forward(x))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class TaskBatchNorm(nn.Module):
    """Batch norm with one set of affine parameters and running statistics per task.

    In the stacked layout each task block is normalised by its own ``F.batch_norm`` call with
    its task's parameters and statistics, so a batched pass computes exactly (bit for bit)
    what the per-task passes compute; one call over all blocks moved to the channel axis would
    reduce in another order on small maps.

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

    def normalize(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """``(B, C, *S)`` of one task -> same shape; in training, updates that task's running statistics in place."""
        weight = self.weight[task] if self.weight is not None else None
        bias = self.bias[task] if self.bias is not None else None
        if self.running_mean is None or self.running_var is None or self.num_batches_tracked is None:
            return F.batch_norm(x, None, None, weight, bias, True, self.momentum, self.eps)
        if self.training:
            self.num_batches_tracked[task] += 1
        # rows of the (T, C) buffers are views: F.batch_norm updates them in place
        return F.batch_norm(x, self.running_mean[task], self.running_var[task], weight, bias, self.training, self.momentum, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n B, C, *S)`` -> same shape, each task block normalised with its task's parameters."""
        tasks = self.router.active
        if len(tasks) == 1:
            return self.normalize(x, tasks[0])
        return torch.cat([self.normalize(block, t) for block, t in zip(x.chunk(len(tasks)), tasks)])


class BlockBatchNorm(nn.BatchNorm2d):
    """Batch norm shared by every task (one set of affine parameters and running statistics), statistics per task block.

    The per-task pass of task ``t`` is a plain ``nn.BatchNorm2d``; in the stacked layout each
    task block is normalised by its own call with the statistics of that block only (the
    per-task pass sees one task's features), and in training with running statistics the
    blocks update them one after the other in task order, as ``n`` successive per-task passes
    do; so the batched pass is bit-equal to the per-task passes. The state dict is that of
    ``nn.BatchNorm2d``.

    Args:
        router: the network's task router.
        num_features, eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d``.
    """

    def __init__(
        self,
        router: TaskRouter,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.router = router

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, router: TaskRouter) -> BlockBatchNorm:
        """A copy of ``bn`` (its settings, affine values and running statistics) that normalises per task block."""
        out = cls(router, bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        out.load_state_dict(bn.state_dict())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n B, C, H, W)`` -> same shape, each task block normalised with its own statistics."""
        n = len(self.router.active)
        if n == 1:
            return super().forward(x)
        return torch.cat([super(BlockBatchNorm, self).forward(block) for block in x.chunk(n)])


def routing_masks(num_tasks: int, channels: int, active_ratio: float, seed: int) -> torch.Tensor:
    """Maximum Roaming's initial Task Routing masks: ``(T, C)`` in {0, 1}.

    Channel ``c`` is first given to task ``c mod T`` (every channel belongs to at least one
    task); then each task gains channels drawn at random among those it lacks until at most a
    fraction ``1 - active_ratio`` of its channels is zero (``zeros / C <= 1 - active_ratio``,
    the test of Maximum Roaming's ``MR`` layer).

    Args:
        num_tasks: ``T``.
        channels: ``C``.
        active_ratio: the fraction of channels each task keeps at least (MR's ``sigma``).
        seed: seed of the draws (task ``t`` draws from ``derive_seed(seed, t)``).
    """
    masks = (torch.arange(channels).remainder(num_tasks) == torch.arange(num_tasks)[:, None]).float()
    max_zeros = max(z for z in range(channels + 1) if z / channels <= 1.0 - active_ratio)
    for t in range(num_tasks):
        free = torch.nonzero(masks[t] == 0).flatten()
        extra = max(0, len(free) - max_zeros)
        generator = torch.Generator().manual_seed(derive_seed(seed, t))
        masks[t, free[torch.randperm(len(free), generator=generator)[:extra]]] = 1.0
    return masks


class TaskChannelMask(nn.Module):
    """Task Routing: a fixed binary channel mask per task (a seeded buffer), built as Maximum Roaming builds it.

    See :func:`routing_masks`: every channel is kept by at least one task, and each task keeps
    at least a fraction ``active_ratio`` of the channels.

    Args:
        router: the network's task router.
        channels: ``C``.
        active_ratio: fraction of channels each task keeps (Maximum Roaming's ``sigma``).
        seed: seed of the masks.
    """

    mask: torch.Tensor

    def __init__(self, router: TaskRouter, channels: int, active_ratio: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < active_ratio <= 1.0:
            raise ValueError(f"active_ratio must lie in (0, 1], got {active_ratio}")
        self.router = router
        self.register_buffer("mask", routing_masks(router.num_tasks, channels, active_ratio, seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n B, C, *S)`` -> same shape, channels of block ``i`` multiplied by the mask of ``tasks[i]``."""
        tasks = self.router.active
        n, (nb, c, *spatial) = len(tasks), x.shape
        mask = self.mask[list(tasks)].to(x.dtype).view(n, 1, c, *([1] * len(spatial)))
        return (x.reshape(n, nb // n, c, *spatial) * mask).reshape(x.shape)


class ETRNLPModule(nn.Sequential):
    """The ETR-NLP module: ``ReLU(TaskBN(cat([NLP(x), specific_t(x)])))``, ``C_in -> C_out``.

    ``specific_t`` is a 3x3 convolution of ``x`` or a 1x1 mix of the NLP's primitive responses
    (``task_branch``, see :class:`RoutedConv`).

    Args:
        router: the network's task router.
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        stride: output stride (primitives then stride; the task branch uses the same stride).
        gamma: sharing ratio.
        nlp: NLP options.
        seed: seed of the primitives.
        task_branch: ``"conv"`` or ``"nlp"``.
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
        task_branch: TaskBranch = "nlp",
    ) -> None:
        super().__init__(
            RoutedConv(router, in_channels, out_channels, 3, stride, 1, False, gamma, "nlp", nlp, seed, task_branch),
            TaskBatchNorm(router, out_channels),
            nn.ReLU(inplace=True),
        )
