"""The :class:`Task` interface: what a network predicts for one task and everything done with it.

A task owns its output channels, its loss, its post-processing of raw outputs into predictions,
its metric and its colourisation, and every kind-specific rule the generic layers apply to its
targets and predictions: the sample-contract checks of a target and random targets, how the joint
transforms treat its target, how a prediction is stored in a file and read back, how it is
resized to the original image, and the evaluation hooks. The generic layers (data, training,
evaluation, benchmarks) call these methods instead of asking which class a task is.

Shapes below are per sample (no batch axis) unless a batch ``B`` is named; ``size`` is an image's
``(H, W)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import torch
from torchmetrics import Metric

from polytask.constants import IGNORE_INDEX
from polytask.metrics import MetricProtocol, check_protocol

TargetKind = Literal["label", "direction", "distance"]
"""How the joint transforms treat a dense target: ``label`` (nearest, padded with 255),
``direction`` (nearest; the x component is negated by a horizontal flip) or ``distance`` (nearest;
divided by the scale factor of a rescale)."""

PredictionFormat = Literal["labels", "probability", "direction", "distance"]
"""The kind of file a dense prediction is saved as (see :mod:`polytask.evaluation.prediction_io`):
``labels`` (8-bit PNG of class ids), ``probability`` (8-bit grey PNG of ``floor(255 p)``),
``direction`` (8-bit RGB PNG of unit vectors) or ``distance`` (``.npy`` metres or 16-bit PNG of
millimetres)."""

DepthFormat = Literal["npy", "png16"]
"""File of a ``distance`` prediction: float32 metres (``npy``) or 16-bit millimetres (``png16``)."""

TargetProblemKind = Literal["out_of_range", "nan"]
"""What is wrong with a target's values."""

Size = tuple[int, int]


class TargetError(ValueError):
    """A target that breaks the sample contract; the message names the task and what was expected."""


def class_id_problems(value: torch.Tensor, num_classes: int, ignore: bool = True) -> list[tuple[TargetProblemKind, str]]:
    """``out_of_range`` when ``value`` holds ids outside ``0..num_classes - 1`` (255 allowed when ``ignore``)."""
    bad = (value < 0) | (value >= num_classes)
    if ignore:
        bad &= value != IGNORE_INDEX
    if not bool(bad.any()):
        return []
    found = sorted({int(v) for v in value[bad].unique()[:10]})
    allowed = " (and 255 = ignore)" if ignore else ""
    return [("out_of_range", f"class id(s) {found} outside 0..{num_classes - 1}{allowed}")]


def nan_problems(value: torch.Tensor) -> list[tuple[TargetProblemKind, str]]:
    """``nan`` when ``value`` holds NaNs."""
    if not bool(torch.isnan(value).any()):
        return []
    return [("nan", f"{int(torch.isnan(value).sum())} NaN value(s)")]


def _layout(shape: Sequence[int | str]) -> str:
    """``(3, H, W)``-style text of a shape."""
    return f"({', '.join(str(s) for s in shape)}{',' if len(shape) == 1 else ''})"


class Task(ABC):
    """One prediction task.

    Attributes:
        name: key of the task in samples, outputs and metric tables.
        out_channels: channels of the raw network output for this task.
        dense: True for per-pixel tasks, False for image-level ones.
        higher_is_better: the metrics that enter Delta_m, with their direction.
        target_dtype: dtype of the target in the sample contract.
        transform_kind: how the joint transforms treat the target (None: image-level, untouched).
        prediction_format: the kind of file a prediction is saved as (None: no file format).
        is_boundary: the task predicts object boundaries: ``polytask evaluate`` may restrict it to
            a boundary subset and score it with the SEISM-equivalent evaluator.
        metric_options: the options of :meth:`with_metric_options` that change this task's metric.
        balances_crops: the random training crop is re-drawn until no class covers most of this
            target (ATRC / mmseg ``cat_max_ratio``; the first such task of a sample decides).
        ignores_empty: a target holding no foreground class (only 0 and 255) is made all-ignore
            after the crop (InvPT / ATRC human parts).
    """

    dense: ClassVar[bool] = True
    higher_is_better: ClassVar[dict[str, bool]] = {}
    target_dtype: ClassVar[torch.dtype] = torch.float32
    transform_kind: ClassVar[TargetKind | None] = None
    prediction_format: ClassVar[PredictionFormat | None] = None
    is_boundary: ClassVar[bool] = False
    metric_options: ClassVar[frozenset[str]] = frozenset()
    balances_crops: bool = False
    ignores_empty: bool = False

    def __init__(self, name: str, out_channels: int) -> None:
        self.name = name
        self.out_channels = out_channels

    # ------------------------------------------------------------------ training

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of raw ``output`` against ``target`` (shapes as in docs/architecture.md)."""

    @abstractmethod
    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Turn the raw output into the prediction the metric consumes."""

    # ------------------------------------------------------------------ targets

    @abstractmethod
    def value_shape(self, size: Size) -> tuple[int, ...]:
        """Shape of one sample's target, and of its post-processed prediction, for an image of ``size``.

        E.g. ``(H, W)`` for labels, ``(3, H, W)`` for normals, ``(K,)`` for ``K`` attributes.
        """

    @abstractmethod
    def target_problems(self, value: torch.Tensor) -> list[tuple[TargetProblemKind, str]]:
        """Values of a decoded target (any shape) that break the sample contract, as ``(kind, detail)`` pairs."""

    @abstractmethod
    def random_target(self, batch_size: int, size: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """A batch ``(B, *value_shape(size))`` of random targets that pass :meth:`check_target`
        (for benchmarks without data), drawn from ``generator``."""

    def check_target(self, value: torch.Tensor, size: Size) -> None:
        """Check one sample's target against the contract: shape :meth:`value_shape` of ``size``,
        dtype :attr:`target_dtype`, values :meth:`target_problems`.

        Raises:
            TargetError: the first violation, naming the task and what was expected.
        """
        expected = self.value_shape(size)
        if tuple(value.shape) != expected:
            raise TargetError(f"{self._label()}: expected a target of shape {_layout(expected)}, got {_layout(value.shape)}")
        if value.dtype != self.target_dtype:
            raise TargetError(f"{self._label()}: expected a {self.target_dtype} target, got {value.dtype}")
        problems = self.target_problems(value)
        if problems:
            raise TargetError(f"{self._label()}: {problems[0][1]}")

    # ------------------------------------------------------------------ predictions

    def check_prediction(self, value: torch.Tensor) -> None:
        """Check one post-processed prediction: shape :meth:`value_shape`, then :meth:`_prediction_problem`.

        Raises:
            ValueError: naming the task and what was expected.
        """
        size = (int(value.shape[-2]), int(value.shape[-1])) if self.dense and value.dim() >= 2 else (0, 0)
        expected = self.value_shape(size)
        if tuple(value.shape) != expected:
            symbolic = [*expected[:-2], "H", "W"] if self.dense else list(expected)
            raise ValueError(f"task {self.name!r}: expected one prediction of shape {_layout(symbolic)}, got {tuple(value.shape)}")
        problem = self._prediction_problem(value)
        if problem is not None:
            raise ValueError(f"task {self.name!r}: {problem}")

    def _prediction_problem(self, value: torch.Tensor) -> str | None:
        """What is wrong with the values of a prediction of the right shape (default: non-finite values)."""
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            return f"prediction holds {int((~finite).sum())} non-finite value(s)"
        return None

    def resize_prediction(self, value: torch.Tensor, size: Size) -> torch.Tensor:
        """One prediction brought to the original image ``size`` (inputs read resized); image-level
        predictions are returned as they are. Dense tasks override this."""
        return value

    def encode_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> tuple[np.ndarray, str]:
        """The array stored for one prediction ``value`` (:meth:`value_shape`), and the file suffix.

        Raises:
            ValueError: the task has no file format (image-level tasks), or the value breaks it.
        """
        raise self._no_file_format()

    def quantize_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> torch.Tensor:
        """What reading back a saved prediction gives, computed in memory (``value`` with or without
        batch axis; same shape back).

        Raises:
            ValueError: the task has no file format.
        """
        raise self._no_file_format()

    def decode_prediction(self, stored: np.ndarray) -> torch.Tensor:
        """The prediction (:meth:`value_shape`) of an array as read from its file: the image's
        pixels (``(H, W)``, ``(H, W, 3)``), probabilities read as SEISM does, or a ``.npy`` map.

        Raises:
            ValueError: values the prediction cannot hold (class ids out of range, negative depth...),
                or the task has no file format.
        """
        raise self._no_file_format()

    def file_format(self) -> PredictionFormat:
        """:attr:`prediction_format`.

        Raises:
            ValueError: the task has none (image-level tasks are not saved as files).
        """
        if self.prediction_format is None:
            raise self._no_file_format()
        return self.prediction_format

    def _no_file_format(self) -> ValueError:
        return ValueError(f"task {self.name!r} ({type(self).__name__}) has no prediction file format; only dense tasks are saved")

    # ------------------------------------------------------------------ metrics and evaluation

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

    def with_metric_options(self, **options: object) -> Task:
        """This task scored with ``options`` (e.g. ``legacy_sigmoid=True``): a new task when one of
        its :attr:`metric_options` changes, else the task itself; never modified in place. Options
        this task does not take are ignored, so one call serves a whole task list."""
        return self

    def metric_settings(self) -> dict[str, str]:
        """Settings of this task's metric that change its numbers, for metric tables (default none)."""
        return {}

    def per_class_results(self, metric: Metric) -> dict[str, float] | None:
        """``{class name: value}`` of ``metric`` (this task's, computed) per class, or None (default)."""
        return None

    @classmethod
    def joint_results(cls, metrics: Sequence[Metric]) -> dict[str, dict[str, float]]:
        """Results over every task of this class at once, ``{results key: {metric: value}}``, from
        their metrics (updated, not yet reset); default none."""
        return {}

    # ------------------------------------------------------------------ pictures

    @abstractmethod
    def colorize(self, value: torch.Tensor) -> np.ndarray:
        """RGB picture ``(H, W, 3)`` uint8 of one prediction or target (no batch axis)."""

    def _label(self) -> str:
        return f"task {self.name!r} ({type(self).__name__})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, out_channels={self.out_channels})"
