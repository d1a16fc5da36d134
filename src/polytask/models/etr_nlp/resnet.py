"""Routed timm ResNets: :class:`RoutedResNet` (the CelebA ResNet-18, linear head per attribute group) and its
registered variants, and :class:`ETRNLPTimmResNet` (multi-scale ResNet + fusion decoder, ETR-NLP routed)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from polytask.models.backbones import TimmBackbone, create_timm_model
from polytask.models.base import register_model
from polytask.models.etr_nlp.layers import TaskBranch
from polytask.models.etr_nlp.net import RoutedNet, TaskBatching, register_routing_variants
from polytask.models.etr_nlp.nlp import NLPOptions
from polytask.models.heads import FusionDecoder, make_head
from polytask.tasks import Task


def kaiming_init(conv: nn.Conv2d) -> None:
    """timm's ResNet initialisation: Kaiming-normal (fan-out, ReLU) weights, zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class FeatureMap(nn.Module):
    """A timm classifier's ``forward_features``: ``(B, 3, H, W)`` -> ``(B, C, H / 32, W / 32)``.

    Args:
        model: a timm model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> the last stage's map."""
        return self.model.forward_features(images)


class BackboneDecoder(nn.Module):
    """:class:`TimmBackbone` followed by :class:`FusionDecoder` (the trunk of ``HardSharing``).

    Args:
        backbone: multi-scale backbone.
        decoder: fusion decoder over the backbone's maps.
    """

    def __init__(self, backbone: TimmBackbone, decoder: FusionDecoder) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, decoder channels, H_0, W_0)`` at the finest backbone scale."""
        return self.decoder(self.backbone(images))


class RoutedResNet(RoutedNet):
    """A timm ResNet trunk (CelebA setting: from scratch, BN without running statistics) routed by ``routing``, a head per task.

    Image-level tasks get global average pooling + a linear layer (one per attribute group);
    dense tasks get polytask's :class:`~polytask.models.heads.DenseHead`. Registered once per
    routing kind as ``<routing>_resnet18`` (``etr_nlp_resnet18``, ``hard_sharing_resnet18``, ...).
    ``(B, 3, H, W)`` -> ``{task: (B, C_t)}`` (image-level) or ``(B, C_t, H, W)`` (dense).

    Args:
        tasks: the tasks to predict.
        backbone: timm ResNet name.
        running_stats: keep batch-norm running statistics (False: batch statistics in evaluation too).
        head_channels: hidden width of dense heads.
        backbone_options: other ``timm.create_model`` options (e.g. ``channels``, ``stem_width``).
        routing_options: ``routing`` (the kind, default ``etr_nlp``) and its options, see :class:`RoutedNet`.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        backbone: str = "resnet18",
        running_stats: bool = False,
        head_channels: int = 64,
        backbone_options: dict[str, Any] | None = None,
        **routing_options: Any,
    ) -> None:
        model = create_timm_model(
            backbone, num_classes=0, global_pool="",
            norm_layer=partial(nn.BatchNorm2d, track_running_stats=running_stats), **(backbone_options or {}),
        )
        width = model.num_features
        heads = {t.name: make_head(t.dense, width, t.out_channels, head_channels) for t in tasks}
        super().__init__(tasks, FeatureMap(model), heads, kaiming_init, **routing_options)


register_routing_variants(RoutedResNet, "resnet18")


@register_model("etr_nlp_timm_resnet")
class ETRNLPTimmResNet(RoutedNet):
    """The trunk of ``HardSharing`` (multi-scale timm ResNet + fusion decoder) with every convolution ETR-NLP routed.

    Its plain counterparts are the registered ``hard_sharing`` and ``single_task`` networks
    with the same options. Trained from scratch (the routed convolutions are new weights).
    ``(B, 3, H, W)`` -> ``{task: (B, C_t, H, W)}`` (dense) or ``(B, C_t)``.

    Args:
        tasks: the tasks to predict.
        backbone: timm ResNet name.
        out_indices: backbone stages fed to the decoder.
        decoder_channels: width of the fusion decoder.
        head_channels: hidden width of each dense head.
        backbone_options: other ``timm.create_model`` options.
        gamma: sharing ratio (default 0.9).
        nlp: NLP options.
        seed: seed of the primitives.
        task_branch: task-specific branch, ``nlp`` (default) or ``conv``.
        task_batching: how ``forward`` runs the task paths (:func:`~polytask.models.etr_nlp.net.choose_task_batching`).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        backbone: str = "resnet18",
        out_indices: Sequence[int] = (1, 2, 3, 4),
        decoder_channels: int = 128,
        head_channels: int = 64,
        backbone_options: dict[str, Any] | None = None,
        gamma: float | None = None,
        nlp: NLPOptions | None = None,
        seed: int = 0,
        task_branch: TaskBranch | None = None,
        task_batching: TaskBatching = "auto",
    ) -> None:
        encoder = TimmBackbone(backbone, out_indices, **(backbone_options or {}))
        trunk = BackboneDecoder(encoder, FusionDecoder(encoder.out_channels, decoder_channels))
        heads = {t.name: make_head(t.dense, decoder_channels, t.out_channels, head_channels) for t in tasks}
        super().__init__(
            tasks, trunk, heads, kaiming_init, routing="etr_nlp", gamma=gamma, nlp=nlp, seed=seed,
            task_branch=task_branch, task_batching=task_batching,
        )
