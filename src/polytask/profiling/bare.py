"""The bare network: a config's backbone with one Conv1x1 head per dense task (GAP + Linear for image-level tasks), the reference of the overhead ratios."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from polytask.models.base import MultiTaskNet
from polytask.tasks import Task


def last_feature_map(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map ``(B, C, h, w)`` of ``images`` ``(B, 3, H, W)``.

    timm models with ``forward_intermediates`` (ViTs: tokens of the last block reshaped to a map)
    are read through it; other backbones must return a map or a list of maps (the last is taken).
    """
    if hasattr(backbone, "forward_intermediates"):
        return backbone.forward_intermediates(images, indices=1, output_fmt="NCHW", intermediates_only=True)[-1]
    out = backbone(images)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if not (isinstance(out, torch.Tensor) and out.dim() == 4):
        raise TypeError(f"{type(backbone).__name__} returns no feature map (B, C, h, w) or list of maps")
    return out


class BareNet(nn.Module):
    """A backbone and the plainest heads: the reference a multi-task network's overhead is measured against.

    Dense tasks: Conv1x1 on the backbone's last feature map, bilinear upsampling to the input size.
    Image-level tasks: global average pooling and a Linear layer.

    Args:
        backbone: the backbone module (shared with the network it comes from, not copied).
        channels: channels of its last feature map.
        tasks: the tasks to predict.
    """

    def __init__(self, backbone: nn.Module, channels: int, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.backbone = backbone
        self.dense = {t.name: t.dense for t in tasks}
        self.heads = nn.ModuleDict(
            {t.name: nn.Conv2d(channels, t.out_channels, 1) if t.dense else nn.Linear(channels, t.out_channels) for t in tasks}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{task: (B, C_t, H, W) or (B, C_t)}``."""
        features = last_feature_map(self.backbone, images)
        size = images.shape[-2:]
        return {
            name: F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)
            if self.dense[name]
            else head(features.mean(dim=(2, 3)))
            for name, head in self.heads.items()
        }

    def aux_loss(self) -> None:
        """No extra loss (:class:`~polytask.training.MultiTaskModule` asks its network for one in every training step)."""
        return None


def make_bare_net(net: MultiTaskNet, tasks: Sequence[Task], image_size: Sequence[int]) -> tuple[BareNet | None, str | None]:
    """The :class:`BareNet` of ``net``'s shared backbone (:meth:`MultiTaskNet.shared_backbone`), or
    ``None`` and the reason it cannot be built."""
    backbone = net.shared_backbone()
    if backbone is None:
        return None, f"{type(net).__name__} has no shared backbone that runs alone"
    device = next(net.parameters()).device
    was_training = backbone.training
    try:
        with torch.no_grad():
            probe = last_feature_map(backbone.eval(), torch.zeros(1, 3, *image_size, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means the backbone does not run on its own
        return None, f"the shared backbone of {type(net).__name__} does not run outside the net: {type(err).__name__}: {err}"
    finally:
        backbone.train(was_training)
    return BareNet(backbone, int(probe.shape[1]), tasks).to(device), None
