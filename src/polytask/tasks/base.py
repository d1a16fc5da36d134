"""Task definitions: what a network predicts for one task and how it is trained and scored.

A :class:`Task` owns its output channels, its loss, its post-processing of raw outputs into
predictions, its metric and its colourisation. Tasks are built by name from a registry
(:func:`build_task`); a dataset declares which tasks it carries with their options
(number of classes, class names) and its default loss weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from polytask import losses
from polytask.metrics import (
    AttributeMetric,
    BoundaryFMetric,
    ClassificationAccuracy,
    DepthMetric,
    MaximumRoamingAttributeMetric,
    MaximumRoamingDepthMetric,
    MaximumRoamingNormalsMetric,
    MaximumRoamingSegmentationMetric,
    MetricProtocol,
    NormalsMetric,
    SaliencyMetric,
    SegmentationMetric,
    check_protocol,
)
from polytask.viz import colorize_depth, colorize_labels, colorize_normals, colorize_probability

IGNORE_INDEX = losses.IGNORE_INDEX


class Task(ABC):
    """One prediction task.

    Attributes:
        name: key of the task in samples, outputs and metric tables.
        dense: True for per-pixel tasks, False for image-level ones.
        out_channels: channels of the raw network output for this task.
        higher_is_better: the metrics that enter Delta_m, with their direction.
    """

    dense: ClassVar[bool] = True
    higher_is_better: ClassVar[dict[str, bool]] = {}

    def __init__(self, name: str, out_channels: int) -> None:
        self.name = name
        self.out_channels = out_channels

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of raw ``output`` against ``target`` (shapes as in docs/architecture.md)."""

    @abstractmethod
    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Turn the raw output into the prediction the metric consumes."""

    @abstractmethod
    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        """A fresh metric accumulating this task over a split under ``protocol``.

        Raises:
            ValueError: the protocol is unknown or defines no metric for this task.
        """

    def _split_level_only(self, protocol: str) -> None:
        """Raise ValueError unless ``protocol`` is ``split_level`` (a task Maximum Roaming does not score)."""
        if check_protocol(protocol) != "split_level":
            raise ValueError(f"task {self.name!r} ({type(self).__name__}) has no metric under protocol {protocol!r}")

    @abstractmethod
    def colorize(self, value: torch.Tensor) -> np.ndarray:
        """RGB picture ``(H, W, 3)`` uint8 of one prediction or target (no batch axis)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, out_channels={self.out_channels})"


class SegmentationTask(Task):
    """Per-pixel classification (semantic segmentation, human parts).

    Args:
        name: task name.
        num_classes: ``C``.
        class_names: one name per class (default: the class ids).
        positive_class: for a one-vs-rest task (Maximum Roaming's binary split), the class it
            detects; the ``maximum_roaming`` protocol then scores that class only. The split-level
            metric scores every class either way.
    """

    higher_is_better = {"mIoU": True}

    def __init__(
        self, name: str, num_classes: int, class_names: Sequence[str] | None = None, positive_class: int | None = None
    ) -> None:
        super().__init__(name, num_classes)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"task {name!r}: {len(class_names)} class names given for {num_classes} classes")
        if positive_class is not None and not 0 <= positive_class < num_classes:
            raise ValueError(f"task {name!r}: positive_class {positive_class} outside 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.positive_class = positive_class
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with ignore 255: output ``(B, C, H, W)``, target ``(B, H, W)``."""
        return losses.cross_entropy(output, target)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Argmax labels ``(B, H, W)`` int64."""
        return output.argmax(dim=1)

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        if check_protocol(protocol) == "maximum_roaming":
            return MaximumRoamingSegmentationMetric(self.num_classes, positive_class=self.positive_class)
        return SegmentationMetric(self.num_classes)

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


class SaliencyTask(Task):
    """Two-class saliency with batch-balanced cross-entropy; predictions are P(salient)."""

    higher_is_better = {"maxF": True}

    def __init__(self, name: str = "sal", legacy_sigmoid: bool = False) -> None:
        super().__init__(name, 2)
        self.legacy_sigmoid = legacy_sigmoid

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Balanced 2-class CE: output ``(B, 2, H, W)``, target ``(B, H, W)`` in {0, 1, 255}."""
        return losses.balanced_cross_entropy(output, target)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Probability of the salient class ``(B, H, W)``."""
        return output.float().softmax(dim=1)[:, 1]

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        self._split_level_only(protocol)
        return SaliencyMetric(legacy_sigmoid=self.legacy_sigmoid)

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        return colorize_probability(value.float().cpu().numpy())


class NormalsTask(Task):
    """Surface normals: L1 on the L2-normalised prediction; predictions are unit vectors."""

    higher_is_better = {"mean": False}

    def __init__(self, name: str = "normals") -> None:
        super().__init__(name, 3)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Normals L1: output and target ``(B, 3, H, W)``."""
        return losses.normals_l1(output, target)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Unit normals ``(B, 3, H, W)``."""
        return F.normalize(output.float(), p=2, dim=1)

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        if check_protocol(protocol) == "maximum_roaming":
            return MaximumRoamingNormalsMetric()
        return NormalsMetric()

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        return colorize_normals(value.float().cpu().numpy())


class EdgeTask(Task):
    """Boundary detection with HED-weighted BCE; predictions are boundary probabilities."""

    higher_is_better = {"F_tol": True}

    def __init__(self, name: str = "edge", pos_weight: float = 0.95) -> None:
        super().__init__(name, 1)
        self.pos_weight = pos_weight

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """HED BCE: output and target ``(B, 1, H, W)``."""
        return losses.hed_bce(output, target, pos_weight=self.pos_weight)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Boundary probability ``(B, 1, H, W)``."""
        return output.float().sigmoid()

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        self._split_level_only(protocol)
        return BoundaryFMetric()

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        return colorize_probability(value.float().cpu().numpy()[0])


class DepthTask(Task):
    """Metric depth with masked L1; predictions are depths in metres."""

    higher_is_better = {"rmse": False}

    def __init__(self, name: str = "depth") -> None:
        super().__init__(name, 1)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Masked L1: output and target ``(B, 1, H, W)``."""
        return losses.depth_l1(output, target)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Depth ``(B, 1, H, W)`` in float32, clamped at 0 as the InvPT post-processing does."""
        return output.float().clamp(min=0.0)

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        if check_protocol(protocol) == "maximum_roaming":
            return MaximumRoamingDepthMetric()
        return DepthMetric()

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        return colorize_depth(value.float().cpu().numpy()[0])


class AttributeTask(Task):
    """A group of binary image-level attributes (e.g. the CelebA groups)."""

    dense = False
    higher_is_better = {"f1": True}

    def __init__(self, name: str, attribute_names: Sequence[str]) -> None:
        super().__init__(name, len(attribute_names))
        self.attribute_names = list(attribute_names)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE on sigmoid: output and target ``(B, K)``."""
        return losses.multilabel_bce(output, target)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Attribute probabilities ``(B, K)``."""
        return output.float().sigmoid()

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        if check_protocol(protocol) == "maximum_roaming":
            return MaximumRoamingAttributeMetric(self.out_channels)
        return AttributeMetric(self.out_channels)

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        row = (value.float().cpu().numpy().reshape(1, -1) > 0.5).astype(np.float32)
        return colorize_probability(np.repeat(np.repeat(row, 16, axis=0), 16, axis=1))


class ImageClassificationTask(Task):
    """Multi-class image-level classification: output ``(B, C)`` logits, target ``(B,)`` class ids.

    Args:
        name: task name.
        num_classes: ``C``.
    """

    dense = False
    higher_is_better = {"accuracy": True}

    def __init__(self, name: str, num_classes: int) -> None:
        super().__init__(name, num_classes)
        self.num_classes = num_classes

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy: output ``(B, C)``, target ``(B,)``."""
        return F.cross_entropy(output.float(), target.long())

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Predicted class ids ``(B,)`` int64."""
        return output.argmax(dim=1)

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        self._split_level_only(protocol)
        return ClassificationAccuracy()

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        """A row of ``C`` 16x16 cells, the cell of the class ``value`` (0-dim) white."""
        row = np.zeros((1, self.num_classes), dtype=np.float32)
        row[0, int(value)] = 1.0
        return colorize_probability(np.repeat(np.repeat(row, 16, axis=0), 16, axis=1))


TASK_REGISTRY: dict[str, Callable[..., Task]] = {
    "semseg": lambda **kw: SegmentationTask(name=kw.pop("name", "semseg"), **kw),
    "human_parts": lambda **kw: SegmentationTask(name=kw.pop("name", "human_parts"), **kw),
    "binary_seg": BinarySegmentationTask,
    "sal": SaliencyTask,
    "normals": NormalsTask,
    "edge": EdgeTask,
    "depth": DepthTask,
    "attributes": AttributeTask,
    "classification": ImageClassificationTask,
}


def build_task(kind: str, **options: object) -> Task:
    """Build a task of a registered kind.

    Args:
        kind: one of ``TASK_REGISTRY`` (semseg, human_parts, binary_seg, sal, normals, edge, depth,
            attributes, classification).
        options: the task's constructor arguments (e.g. ``num_classes``, ``class_names``, ``name``).
    """
    if kind not in TASK_REGISTRY:
        raise ValueError(f"unknown task kind {kind!r}; known kinds: {sorted(TASK_REGISTRY)}")
    try:
        return TASK_REGISTRY[kind](**options)
    except TypeError as err:
        raise TypeError(f"task kind {kind!r}: bad options {sorted(options)}: {err}") from err


def select_tasks(available: Sequence[Task], names: Sequence[str] | None, source: str) -> list[Task]:
    """Keep the tasks named in ``names`` (all when None), in the given order.

    Raises:
        ValueError: a name is not among ``available``; the message names ``source`` (the dataset).
    """
    by_name = {t.name: t for t in available}
    if names is None:
        return list(available)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"{source} does not carry task(s) {unknown}; it carries {list(by_name)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {list(names)}")
    return [by_name[n] for n in names]
