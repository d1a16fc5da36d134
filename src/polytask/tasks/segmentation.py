"""Per-pixel classification: semantic segmentation, human parts, and Maximum Roaming's one-vs-rest binary segmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from polytask import losses
from polytask.metrics import (
    MaximumRoamingSegmentationMetric,
    MetricProtocol,
    SegmentationMetric,
    check_protocol,
)
from polytask.tasks.base import DepthFormat, Size, TargetProblemKind, Task, class_id_problems
from polytask.viz import colorize_labels

MAX_PNG_CLASSES = 256
"""Classes an 8-bit label PNG can hold."""


class SegmentationTask(Task):
    """Per-pixel classification (semantic segmentation, human parts).

    Targets and predictions are int64 labels ``(H, W)``, targets with 255 = ignore; predictions
    are saved as 8-bit PNGs of class ids.

    Args:
        name: task name.
        num_classes: ``C``.
        class_names: one name per class (default: the class ids).
        positive_class: for a one-vs-rest task (Maximum Roaming's binary split), the class it
            detects; the ``maximum_roaming`` protocol then scores that class only. The split-level
            metric scores every class either way.
        balances_crops: training crops are re-drawn until no class covers most of this target
            (:attr:`Task.balances_crops`; semantic segmentation).
        ignores_empty: a target without any class but background 0 is made all-ignore after the
            crop (:attr:`Task.ignores_empty`; human parts).
    """

    higher_is_better = {"mIoU": True}
    target_dtype = torch.int64
    transform_kind = "label"
    prediction_format = "labels"

    def __init__(
        self,
        name: str,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        positive_class: int | None = None,
        balances_crops: bool = True,
        ignores_empty: bool = False,
    ) -> None:
        super().__init__(name, num_classes)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"task {name!r}: {len(class_names)} class names given for {num_classes} classes")
        if positive_class is not None and not 0 <= positive_class < num_classes:
            raise ValueError(f"task {name!r}: positive_class {positive_class} outside 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.positive_class = positive_class
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.balances_crops = balances_crops
        self.ignores_empty = ignores_empty

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with ignore 255: output ``(B, C, H, W)``, target ``(B, H, W)``."""
        return losses.cross_entropy(output, target)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Argmax labels ``(B, H, W)`` int64."""
        return output.argmax(dim=1)

    def value_shape(self, size: Size) -> tuple[int, ...]:
        """``(H, W)``."""
        return (size[0], size[1])

    def target_problems(self, value: torch.Tensor) -> list[tuple[TargetProblemKind, str]]:
        """Class ids outside ``0..C-1`` other than 255."""
        return class_id_problems(value, self.num_classes)

    def random_target(self, batch_size: int, size: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform class ids ``(B, H, W)`` int64."""
        return torch.randint(0, self.num_classes, (batch_size, *size), generator=generator)

    def _prediction_problem(self, value: torch.Tensor) -> str | None:
        if value.is_floating_point():
            return f"expected integer labels, got {value.dtype}"
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= self.num_classes):
            return f"labels {int(value.min())}..{int(value.max())} outside 0..{self.num_classes - 1}"
        return None

    def resize_prediction(self, value: torch.Tensor, size: Size) -> torch.Tensor:
        """Labels ``(H, W)`` resized to ``size`` by nearest neighbour."""
        return F.interpolate(value[None, None].float(), size=size, mode="nearest")[0, 0].to(value.dtype)

    def encode_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> tuple[np.ndarray, str]:
        """uint8 ``(H, W)`` class ids, ``.png``.

        Raises:
            ValueError: more classes than 8 bits hold, a float or out-of-range label, a wrong shape.
        """
        if self.num_classes > MAX_PNG_CLASSES:
            raise ValueError(f"task {self.name!r}: {self.num_classes} classes do not fit an 8-bit label PNG")
        self.check_prediction(value)
        return value.detach().cpu().numpy().astype(np.uint8), ".png"

    def quantize_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> torch.Tensor:
        """Labels are stored exactly: ``value`` itself."""
        return value

    def decode_prediction(self, stored: np.ndarray) -> torch.Tensor:
        """int64 ``(H, W)`` of the PNG's values.

        Raises:
            ValueError: class ids outside ``0..C-1``.
        """
        labels = stored.astype(np.int64)
        bad = labels >= self.num_classes
        if bad.any():
            found = sorted({int(v) for v in np.unique(labels[bad])[:10]})
            raise ValueError(f"class id(s) {found} outside 0..{self.num_classes - 1}")
        return torch.from_numpy(labels)

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        if check_protocol(protocol) == "maximum_roaming":
            return MaximumRoamingSegmentationMetric(self.num_classes, positive_class=self.positive_class)
        return SegmentationMetric(self.num_classes)

    def per_class_results(self, metric: Metric) -> dict[str, float] | None:
        """``{class name: IoU}`` in percent, classes in id order, of the split-level metric (None under other protocols)."""
        if not isinstance(metric, SegmentationMetric):
            return None
        return {name: float(v) for name, v in zip(self.class_names, metric.per_class_iou().tolist(), strict=True)}

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        return colorize_labels(value.cpu().numpy(), self.num_classes)


class BinarySegmentationTask(SegmentationTask):
    """One-class-vs-rest segmentation trained as Maximum Roaming trains it: one sigmoid logit, per-pixel BCE.

    The raw output has one channel (the logit of the class); predictions are labels in {0, 1}
    (logit >= 0, i.e. probability >= 0.5, Maximum Roaming's threshold) scored like a 2-class
    segmentation whose positive class is 1. Targets are ``(B, H, W)`` in {0, 1, 255}.

    Args:
        name: task name.
        class_names: ``[negative, positive]`` names.
        unlabelled: ``"negative"`` (Maximum Roaming: unlabelled pixels are negatives of every
            class in the loss) or ``"ignore"``; see :func:`polytask.losses.binary_segmentation_bce`.
    """

    def __init__(
        self, name: str, class_names: Sequence[str] | None = None, unlabelled: Literal["negative", "ignore"] = "negative"
    ) -> None:
        super().__init__(name, 2, class_names, positive_class=1)
        if unlabelled not in ("negative", "ignore"):
            raise ValueError(f"task {name!r}: unlabelled must be 'negative' or 'ignore', got {unlabelled!r}")
        self.out_channels = 1
        self.unlabelled = unlabelled

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE on the sigmoid: output ``(B, 1, H, W)``, target ``(B, H, W)``."""
        return losses.binary_segmentation_bce(output, target, self.unlabelled)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Labels ``(B, H, W)`` int64: 1 where the logit is >= 0."""
        return (output[:, 0] >= 0).long()
