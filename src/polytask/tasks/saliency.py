"""Saliency: two-class per-pixel prediction scored by maxF."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from polytask import losses
from polytask.metrics import MetricProtocol, SaliencyMetric
from polytask.tasks.base import Size, TargetProblemKind, class_id_problems
from polytask.tasks.probability import ProbabilityMapTask
from polytask.viz import colorize_probability


class SaliencyTask(ProbabilityMapTask):
    """Two-class saliency with batch-balanced cross-entropy; predictions are P(salient) ``(H, W)``.

    Targets are int64 ``(H, W)`` in {0, 1, 255}.

    Args:
        name: task name.
        legacy_sigmoid: score maxF with the InvPT-family quirk (a sigmoid applied to the
            probabilities first); see :class:`~polytask.metrics.SaliencyMetric`.
    """

    higher_is_better = {"maxF": True}
    target_dtype = torch.int64
    transform_kind = "label"
    metric_options = frozenset({"legacy_sigmoid"})

    def __init__(self, name: str = "sal", legacy_sigmoid: bool = False) -> None:
        super().__init__(name, 2)
        self.legacy_sigmoid = legacy_sigmoid

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Balanced 2-class CE: output ``(B, 2, H, W)``, target ``(B, H, W)`` in {0, 1, 255}."""
        return losses.balanced_cross_entropy(output, target)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Probability of the salient class ``(B, H, W)``."""
        return output.float().softmax(dim=1)[:, 1]

    def value_shape(self, size: Size) -> tuple[int, ...]:
        """``(H, W)``."""
        return (size[0], size[1])

    def target_problems(self, value: torch.Tensor) -> list[tuple[TargetProblemKind, str]]:
        """Values other than 0, 1 and 255."""
        return class_id_problems(value, 2)

    def random_target(self, batch_size: int, size: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform {0, 1} ``(B, H, W)`` int64."""
        return torch.randint(0, 2, (batch_size, *size), generator=generator)

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        self._split_level_only(protocol)
        return SaliencyMetric(legacy_sigmoid=self.legacy_sigmoid)

    def with_metric_options(self, **options: object) -> SaliencyTask:
        """A new saliency task when ``legacy_sigmoid`` is given and differs, else this one."""
        legacy_sigmoid = bool(options.get("legacy_sigmoid", self.legacy_sigmoid))
        if legacy_sigmoid == self.legacy_sigmoid:
            return self
        return type(self)(self.name, legacy_sigmoid=legacy_sigmoid)

    def metric_settings(self) -> dict[str, str]:
        """Whether maxF used the legacy sigmoid."""
        return {f"{self.name} maxF": f"legacy_sigmoid={'on' if self.legacy_sigmoid else 'off'}"}

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        return colorize_probability(value.float().cpu().numpy())
