"""Parameter and FLOP counts of a multi-task network at a given resolution."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


@dataclass
class ModelSummary:
    """Counts of one network.

    Attributes:
        total_params: all parameters.
        trainable_params: parameters with ``requires_grad``.
        groups: trainable parameters per component (``param_groups()`` of the network).
        buffers: elements of registered buffers (e.g. frozen primitives).
        flops: forward FLOPs of one image at ``image_size`` (torch's FLOP counter: 2 per multiply-add).
        image_size: ``(H, W)`` used for the FLOP count.
    """

    total_params: int
    trainable_params: int
    groups: dict[str, int] = field(default_factory=dict)
    buffers: int = 0
    flops: int = 0
    image_size: tuple[int, int] = (0, 0)

    def as_dict(self) -> dict[str, object]:
        """Plain-dict form for JSON."""
        return {
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "groups": dict(self.groups),
            "buffers": self.buffers,
            "flops": self.flops,
            "gflops": self.flops / 1e9,
            "image_size": list(self.image_size),
        }


def onednn_convolution_flops(
    x_shape: Sequence[int], w_shape: Sequence[int], *args: object, out_shape: Sequence[int], **kwargs: object
) -> int:
    """FLOPs of ``mkldnn::_convolution_pointwise`` (oneDNN's convolution, called directly by ETR-NLP's
    mixes on the CPU), as of a convolution."""
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def flop_counter(net: nn.Module, image_size: Sequence[int], batch_size: int = 1) -> FlopCounterMode:
    """A FLOP counter that has seen ``net``'s forward on a zero batch ``(batch_size, 3, H, W)``.

    Attention runs through PyTorch's math backend here: the fused CPU attention kernel is
    invisible to the FLOP counter, so its matmuls would otherwise be missed. Direct calls of
    oneDNN's convolution (ETR-NLP's mixes in float32 on a CPU) are counted as convolutions.
    """
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    images = torch.zeros(batch_size, 3, *image_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.mkldnn._convolution_pointwise: onednn_convolution_flops})
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        net(images)
    net.train(was_training)
    return counter


def count_flops(net: nn.Module, image_size: Sequence[int], batch_size: int = 1) -> int:
    """Forward FLOPs of ``net`` on a zero batch ``(batch_size, 3, H, W)`` (per batch), see :func:`flop_counter`."""
    return int(flop_counter(net, image_size, batch_size).get_total_flops())


def training_resolution(net: object, datamodule: object) -> tuple[int, int] | None:
    """The ``(H, W)`` a config trains at: the network's ``image_size``, else the datamodule's
    ``image_size`` or ``train_size``, whichever is first an ``(H, W)`` pair; None when none is
    (e.g. CelebA's datamodule gives only the short side)."""
    for owner, attr in ((net, "image_size"), (datamodule, "image_size"), (datamodule, "train_size")):
        size = getattr(owner, attr, None)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return int(size[0]), int(size[1])
    return None


def summarize_model(net: nn.Module, image_size: Sequence[int]) -> ModelSummary:
    """Parameters (total, trainable, per component) and forward FLOPs of one image."""
    groups_fn = getattr(net, "param_groups", None)
    groups = {k: sum(p.numel() for p in ps if p.requires_grad) for k, ps in groups_fn().items()} if groups_fn else {}
    return ModelSummary(
        total_params=sum(p.numel() for p in net.parameters()),
        trainable_params=sum(p.numel() for p in net.parameters() if p.requires_grad),
        groups=groups,
        buffers=sum(b.numel() for b in net.buffers()),
        flops=count_flops(net, image_size),
        image_size=(int(image_size[0]), int(image_size[1])),
    )
