"""Decoders (feature fusion) and per-task heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv(k, same padding, no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FusionDecoder(nn.Module):
    """Project every feature map to ``channels``, upsample to the finest one and sum, then a 3x3 conv.

    Args:
        in_channels: channels of each input map.
        channels: output channels.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 128) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = conv_bn_act(channels, channels)
        self.out_channels = channels

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """list of ``(B, C_i, H_i, W_i)`` -> ``(B, channels, H_0, W_0)`` at the finest input size."""
        size = features[0].shape[-2:]
        fused = self.lateral[0](features[0])
        for lateral, feat in zip(self.lateral[1:], features[1:]):
            fused = fused + F.interpolate(lateral(feat), size=size, mode="bilinear", align_corners=False)
        return self.fuse(fused)


class DenseHead(nn.Module):
    """Conv3x3-BN-ReLU -> Conv1x1, then bilinear upsampling to the requested size.

    Args:
        in_channels: input channels.
        out_channels: the task's output channels.
        hidden: channels of the 3x3 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.body = conv_bn_act(in_channels, hidden)
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, out_channels, *size)``."""
        y = self.out(self.body(x))
        return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)


class ImageHead(nn.Module):
    """Global average pooling -> Linear, for image-level tasks.

    Args:
        in_channels: input channels.
        out_channels: outputs of the task (e.g. attributes in a group).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, out_channels)``; ``size`` is ignored."""
        return self.fc(x.mean(dim=(2, 3)))


def make_head(dense: bool, in_channels: int, out_channels: int, hidden: int = 64) -> nn.Module:
    """The default head for a dense or an image-level task."""
    if dense:
        return DenseHead(in_channels, out_channels, hidden)
    return ImageHead(in_channels, out_channels)
