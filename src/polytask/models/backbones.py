"""Backbones: timm models returning multi-scale feature maps."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import huggingface_hub
import timm
import torch
from torch import nn


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were requested but could not be loaded."""


def create_timm_model(
    name: str,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    **kwargs: object,
) -> nn.Module:
    """``timm.create_model`` with a clear error when pretrained weights cannot be fetched.

    Args:
        name: a timm model name, optionally with a pretrained tag (``vit_base_patch16_384.augreg_in21k_ft_in1k``).
        pretrained: load pretrained weights through timm (Hugging Face Hub or its local cache).
        pretrained_file: a local weights file to load instead of downloading (implies ``pretrained``).
        kwargs: passed to ``timm.create_model``.
    """
    if pretrained_file is not None:
        if not Path(pretrained_file).is_file():
            raise PretrainedWeightsError(f"pretrained_file {str(pretrained_file)!r} for timm model {name!r} does not exist")
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
        pretrained = True
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        raise PretrainedWeightsError(f"could not load pretrained weights for timm model {name!r}: {err}\n{OFFLINE_HINT}") from err


OFFLINE_HINT = (
    "To run offline: --model.init_args.net.init_args.pretrained false (random initialisation), or "
    "--model.init_args.net.init_args.pretrained_file /path/to/weights.safetensors (a local file), or copy "
    "the Hugging Face cache of a connected machine (default ~/.cache/huggingface, $HF_HOME) here and set HF_HUB_OFFLINE=1."
)
"""How to run a pretrained config without network access (docs/reliability.md, "Offline")."""


def _hub_reachable(timeout: float = 3.0) -> bool:
    if huggingface_hub.constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE as the Hub client itself reads it
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def pretrained_weights_problem(name: str) -> str | None:
    """Why timm's pretrained weights of model ``name`` cannot be loaded on this machine, or ``None``.

    ``None`` when the weights are in the Hugging Face or torch hub cache, or when the Hub can be
    reached (a 3-second connection test; never with ``HF_HUB_OFFLINE=1``), or when timm knows no
    pretrained weights for ``name`` (building the model reports that).
    """
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError):
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if filename and isinstance(huggingface_hub.try_to_load_from_cache(repo, filename), str):
                return None
    if cfg.url and (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file():
        return None
    if _hub_reachable():
        return None
    return (
        f"the pretrained weights of timm model {name!r} are not in the local caches "
        f"(Hugging Face: {huggingface_hub.constants.HF_HUB_CACHE}; torch hub: {torch.hub.get_dir()}) "
        "and huggingface.co cannot be reached"
    )


class TimmBackbone(nn.Module):
    """A timm model in ``features_only`` mode: a list of feature maps, fine to coarse.

    Works for CNNs (ResNet stages) and for ViTs (tokens of the chosen blocks reshaped to
    ``(B, C, H/16, W/16)``).

    Args:
        name: timm model name.
        out_indices: which stages (CNN) or blocks (ViT) to return.
        pretrained: load timm pretrained weights.
        pretrained_file: local weights file (offline use).
        img_size: training resolution for ViTs (position embeddings are resampled to it).
        kwargs: other ``timm.create_model`` options (e.g. ``drop_path_rate``).
    """

    def __init__(
        self,
        name: str = "resnet18",
        out_indices: Sequence[int] = (1, 2, 3, 4),
        pretrained: bool = False,
        pretrained_file: str | None = None,
        img_size: Sequence[int] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__()
        if img_size is not None:
            kwargs["img_size"] = tuple(img_size)
        self.name = name
        self.body = create_timm_model(
            name,
            pretrained=pretrained,
            pretrained_file=pretrained_file,
            features_only=True,
            out_indices=tuple(out_indices),
            **kwargs,
        )
        self.out_channels: list[int] = list(self.body.feature_info.channels())
        self.reductions: list[int] = list(self.body.feature_info.reduction())

    def _patch_embed(self) -> nn.Module | None:
        return getattr(getattr(self.body, "model", self.body), "patch_embed", None)

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        """The patch size ``(h, w)`` of a ViT built to take any input size (``dynamic_img_size``):
        inputs must be multiples of it. None for backbones that take any size (CNNs) or one fixed
        size (a ViT without ``dynamic_img_size``)."""
        embed = self._patch_embed()
        if embed is None or getattr(embed, "strict_img_size", True):
            return None
        return tuple(embed.patch_size)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> list of ``(B, C_i, H / r_i, W / r_i)``.

        Raises:
            ValueError: a ViT built for one input size (no ``dynamic_img_size``) got another.
        """
        embed = self._patch_embed()
        if embed is not None and getattr(embed, "strict_img_size", False):
            expected = tuple(embed.img_size)
            if tuple(images.shape[-2:]) != expected:
                raise ValueError(
                    f"backbone {self.name} was built for {expected[0]}x{expected[1]} inputs and got "
                    f"{images.shape[-2]}x{images.shape[-1]}; set backbone_options.dynamic_img_size: true "
                    "to take other sizes (position embeddings are resampled)"
                )
        return list(self.body(images))
