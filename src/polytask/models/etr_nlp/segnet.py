"""MTAN's SegNet encoder-decoder (NYUv2 / Cityscapes setting) and its routed variants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from polytask.models.base import register_model
from polytask.models.etr_nlp.layers import TaskBranch
from polytask.models.etr_nlp.net import RoutedNet
from polytask.models.etr_nlp.nlp import NLPOptions
from polytask.models.etr_nlp.routing import Routing, RoutingKind
from polytask.models.heads import ImageHead
from polytask.tasks import Task

SEGNET_FILTERS: tuple[int, ...] = (64, 128, 256, 512, 512)


def conv_layer(in_channels: int, out_channels: int, running_stats: bool = True) -> nn.Sequential:
    """MTAN's conv layer: Conv3x3 (with bias) -> BatchNorm -> ReLU.

    ``running_stats=False`` is Maximum Roaming's batch norm (``track_running_stats=False``: batch
    statistics in evaluation too).
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=running_stats),
        nn.ReLU(inplace=True),
    )


def xavier_init(conv: nn.Conv2d) -> None:
    """MTAN's initialisation: Xavier-normal weights, zero bias."""
    nn.init.xavier_normal_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def max_unpool(x: torch.Tensor, indices: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.max_unpool2d`` with the indices of a max pooling, written as a scatter.

    Unlike ``max_unpool2d`` it runs under ``torch.use_deterministic_algorithms(True)`` (the
    indices of a pooling are distinct, so the scatter is deterministic).

    Args:
        x: ``(N, C, h, w)`` pooled values.
        indices: ``(N, C, h, w)`` flat positions in the ``size`` map (``max_pool2d(..., return_indices=True)``).
        size: ``(H, W)`` of the map before pooling.

    Returns:
        ``(N, C, H, W)``, zero except at the pooled positions.
    """
    n, c = x.shape[:2]
    flat = x.new_zeros(n, c, size[0] * size[1]).scatter(2, indices.flatten(2), x.flatten(2))
    return flat.view(n, c, size[0], size[1])


class SegNetTrunk(nn.Module):
    """The SegNet of MTAN (``model_segnet_split.py``) without task heads.

    Five encoder stages (a conv layer to ``filters[i]``, then one (stage 0, 1) or two (stages
    2-4) conv layers, then 2x2 max pooling with indices) and a mirrored decoder (max
    unpooling with the stored indices (:func:`max_unpool`), a conv layer to ``filters[i - 1]``, then one or two conv
    layers).

    Args:
        filters: the five stage widths.
        running_stats: batch norms keep running statistics (MTAN); False: batch statistics in
            evaluation too (Maximum Roaming's SegNet).
    """

    def __init__(self, filters: Sequence[int] = SEGNET_FILTERS, running_stats: bool = True) -> None:
        super().__init__()
        f = list(filters)
        if len(f) != 5:
            raise ValueError(f"SegNet needs 5 filter widths, got {f}")

        def layer(in_channels: int, out_channels: int) -> nn.Sequential:
            return conv_layer(in_channels, out_channels, running_stats)

        def repeated(channels: int, stage: int) -> nn.Module:
            return layer(channels, channels) if stage < 2 else nn.Sequential(layer(channels, channels), layer(channels, channels))

        self.encoder_block = nn.ModuleList([layer(3, f[0])] + [layer(f[i], f[i + 1]) for i in range(4)])
        self.decoder_block = nn.ModuleList([layer(f[0], f[0])] + [layer(f[i + 1], f[i]) for i in range(4)])
        self.conv_block_enc = nn.ModuleList(repeated(f[i], i) for i in range(5))
        self.conv_block_dec = nn.ModuleList([layer(f[0], f[0])] + [repeated(f[i], i + 1) for i in range(4)])
        self.out_channels = f[0]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                xavier_init(module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, filters[0], H, W)``."""
        indices, sizes = [], []
        for encode, refine in zip(self.encoder_block, self.conv_block_enc):
            x = refine(encode(x))
            sizes.append(x.shape[-2:])
            x, index = F.max_pool2d(x, 2, 2, return_indices=True)
            indices.append(index)
        for i in reversed(range(5)):
            x = max_unpool(x, indices[i], sizes[i])
            x = self.conv_block_dec[i](self.decoder_block[i](x))
        return x


class SegNetHead(nn.Module):
    """MTAN's task head: Conv3x3 -> Conv1x1 (no normalisation or activation between).

    Args:
        in_channels: trunk channels.
        out_channels: the task's output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.Conv2d(in_channels, out_channels, 1))
        for module in self.body:
            xavier_init(module)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, out_channels, H, W)``; the trunk already works at the input ``size``."""
        if tuple(x.shape[-2:]) != tuple(size):
            raise ValueError(f"SegNet features of size {tuple(x.shape[-2:])} do not match the input size {tuple(size)}")
        return self.body(x)


class RoutedSegNet(RoutedNet):
    """SegNet with one head per task (dense: :class:`SegNetHead`; image-level: pooling + linear), routed by ``ROUTING``.

    Args:
        tasks: the tasks to predict.
        filters: the five stage widths (MTAN: 64-128-256-512-512).
        gamma: sharing ratio (ETR kinds; default 0.9); NLP-only: the ETR-NLP ratio whose mix groups it copies.
        nlp: NLP options (NLP kinds only).
        active_ratio: channels kept per task (Task Routing only; default 0.5).
        seed: seed of the primitives and masks.
        running_stats: batch norms keep running statistics (MTAN); False: batch statistics in
            evaluation too (Maximum Roaming's SegNet).
        task_branch: ETR-NLP's task-specific branch, ``nlp`` (default) or ``conv``.
    """

    ROUTING: ClassVar[RoutingKind]

    def __init__(
        self,
        tasks: Sequence[Task],
        filters: Sequence[int] = SEGNET_FILTERS,
        gamma: float | None = None,
        nlp: NLPOptions | None = None,
        active_ratio: float | None = None,
        seed: int = 0,
        running_stats: bool = True,
        task_branch: TaskBranch | None = None,
    ) -> None:
        trunk = SegNetTrunk(filters, running_stats)
        width = trunk.out_channels
        heads = {t.name: SegNetHead(width, t.out_channels) if t.dense else ImageHead(width, t.out_channels) for t in tasks}
        routing = Routing(self.ROUTING, gamma, nlp, active_ratio, seed, task_branch)
        super().__init__(tasks, routing, trunk, heads, xavier_init)


@register_model("etr_nlp_segnet")
class ETRNLPSegNet(RoutedSegNet):
    """SegNet of ETR-NLP modules: NLP shared branch (gamma) + task-specific branches (``task_branch``)."""

    ROUTING = "etr_nlp"


@register_model("etr_segnet")
class ETRSegNet(RoutedSegNet):
    """Ablation, ETR without NLP: a learnable shared convolution (gamma) + task-specific convolutions."""

    ROUTING = "etr"


@register_model("nlp_segnet")
class NLPSegNet(RoutedSegNet):
    """Ablation, NLP without routing: every convolution a fully shared NLP block, mix grouped as ETR-NLP's at ``gamma``."""

    ROUTING = "nlp"


@register_model("task_routing_segnet")
class TaskRoutingSegNet(RoutedSegNet):
    """Task Routing baseline: shared convolutions and batch norms, fixed random per-task channel masks after each batch norm."""

    ROUTING = "task_routing"


@register_model("hard_sharing_segnet")
class HardSharingSegNet(RoutedSegNet):
    """Hard parameter sharing: the MTAN SegNet shared by every task, one head per task (MTAN's "split")."""

    ROUTING = "hard"


@register_model("single_task_segnet")
class SingleTaskSegNet(RoutedSegNet):
    """Single-task baseline: one independent SegNet per task (every layer task-specific)."""

    ROUTING = "single"
