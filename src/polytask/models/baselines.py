"""Baselines: single-task networks and hard parameter sharing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from polytask.models.backbones import TimmBackbone
from polytask.models.base import MultiTaskNet, forward_on_patch_grid, register_model
from polytask.models.heads import FusionDecoder, make_head
from polytask.tasks import Task


@register_model("hard_sharing")
class HardSharing(MultiTaskNet):
    """Shared backbone and fusion decoder, one light head per task.

    Args:
        tasks: the tasks to predict.
        backbone: timm model name.
        out_indices: backbone stages/blocks fed to the decoder.
        pretrained: load timm pretrained weights.
        pretrained_file: local weights file for offline use.
        decoder_channels: width of the shared fusion decoder.
        head_channels: hidden width of each task head.
        backbone_options: extra ``timm.create_model`` options (``img_size``, ``drop_path_rate``...).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        backbone: str = "resnet18",
        out_indices: Sequence[int] = (1, 2, 3, 4),
        pretrained: bool = False,
        pretrained_file: str | None = None,
        decoder_channels: int = 128,
        head_channels: int = 64,
        backbone_options: dict | None = None,
    ) -> None:
        super().__init__(tasks)
        self.backbone = TimmBackbone(backbone, out_indices, pretrained, pretrained_file, **(backbone_options or {}))
        self.decoder = FusionDecoder(self.backbone.out_channels, decoder_channels)
        self.heads = nn.ModuleDict({t.name: make_head(t.dense, decoder_channels, t.out_channels, head_channels) for t in self.tasks})

    def shared_backbone(self) -> nn.Module:
        """The timm backbone (``(B, 3, H, W)`` -> its feature maps)."""
        return self.backbone

    def shared_parameters(self) -> list[nn.Parameter]:
        """The backbone's and the fusion decoder's trainable parameters (everything but the heads)."""
        return [p for p in (*self.backbone.parameters(), *self.decoder.parameters()) if p.requires_grad]

    def shared_representation_module(self) -> nn.Module:
        """The fusion decoder: its output ``(B, C, h, w)`` is what every head reads."""
        return self.decoder

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "backbone": list(self.backbone.parameters()),
            "decoder": list(self.decoder.parameters()),
            "heads": list(self.heads.parameters()),
        }

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{task: (B, C_t, H, W) or (B, C_t)}``.

        With a ViT built to take any size (``backbone_options.dynamic_img_size: true``), a size that
        is not a multiple of the patch size is padded with zeros at the bottom and right (the mean
        colour of normalised images) and the dense outputs are cropped back to ``(H, W)``, as
        TaskExpert does.
        """
        return forward_on_patch_grid(self._forward_on_grid, images, self.backbone.patch_grid)

    def _forward_on_grid(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward` of images the backbone takes as they are."""
        shared = self.decoder(self.backbone(images))
        size = images.shape[-2:]
        return {name: head(shared, size) for name, head in self.heads.items()}


@register_model("single_task")
class SingleTask(MultiTaskNet):
    """One independent network (backbone, decoder, head) per task: the single-task reference.

    Takes the same options as :class:`HardSharing`; each task gets its own copy.
    """

    def __init__(self, tasks: Sequence[Task], **options: object) -> None:
        super().__init__(tasks)
        self.nets = nn.ModuleDict({t.name: HardSharing([t], **options) for t in self.tasks})

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "decoder": [], "heads": []}
        for net in self.nets.values():
            for key, params in net.param_groups().items():
                groups[key].extend(params)
        return groups

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{task: output}``, each from its own network."""
        out: dict[str, torch.Tensor] = {}
        for net in self.nets.values():
            out.update(net(images))
        return out
