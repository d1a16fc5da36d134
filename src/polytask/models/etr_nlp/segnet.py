"""MTAN's SegNet encoder-decoder (NYUv2 / Cityscapes setting), routed: :class:`RoutedSegNet` and its registered variants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polytask.models.etr_nlp.net import RoutedNet, register_routing_variants
from polytask.models.etr_nlp.nlp import is_channels_last
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
        ``(N, C, H, W)``, zero except at the pooled positions; channels-last when ``x`` is.
    """
    n, c = x.shape[:2]
    if is_channels_last(x):
        rows = x.new_zeros(n, size[0] * size[1], c)
        rows = rows.scatter(1, indices.permute(0, 2, 3, 1).reshape(n, -1, c), x.permute(0, 2, 3, 1).reshape(n, -1, c))
        return rows.view(n, size[0], size[1], c).permute(0, 3, 1, 2)
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
        """``(B, 3, H, W)`` -> ``(B, filters[0], H, W)``, channels-last when ``x`` is."""
        memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        indices, sizes = [], []
        for encode, refine in zip(self.encoder_block, self.conv_block_enc):
            x = refine(encode(x))
            sizes.append(x.shape[-2:])
            x, index = F.max_pool2d(x, 2, 2, return_indices=True)
            indices.append(index)
        for i in reversed(range(5)):
            # a 1x1 map is both layouts at once: the unpooled map takes the trunk's layout again
            x = max_unpool(x, indices[i], sizes[i]).contiguous(memory_format=memory_format)
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
    """MTAN's SegNet (:class:`SegNetTrunk`) routed by ``routing``, one head per task.

    Dense tasks get :class:`SegNetHead`, image-level tasks global average pooling + a linear
    layer. Registered once per routing kind as ``<routing>_segnet`` (``etr_nlp_segnet``,
    ``hard_sharing_segnet``, ...). ``(B, 3, H, W)`` -> ``{task: (B, C_t, H, W)}`` (dense) or ``(B, C_t)``.

    Args:
        tasks: the tasks to predict.
        filters: the five stage widths (MTAN: 64-128-256-512-512).
        running_stats: batch norms keep running statistics (MTAN); False: batch statistics in
            evaluation too (Maximum Roaming's SegNet).
        routing_options: ``routing`` (the kind, default ``etr_nlp``) and its options, see :class:`RoutedNet`.
    """

    def __init__(
        self, tasks: Sequence[Task], filters: Sequence[int] = SEGNET_FILTERS, running_stats: bool = True, **routing_options: Any
    ) -> None:
        trunk = SegNetTrunk(filters, running_stats)
        width = trunk.out_channels
        heads = {t.name: SegNetHead(width, t.out_channels) if t.dense else ImageHead(width, t.out_channels) for t in tasks}
        super().__init__(tasks, trunk, heads, xavier_init, **routing_options)


register_routing_variants(RoutedSegNet, "segnet")
