"""Boundary detection: per-pixel boundary probability."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from polytask import losses
from polytask.constants import IGNORE_INDEX
from polytask.metrics import BoundaryFMetric, MetricProtocol
from polytask.tasks.base import Size, TargetProblemKind, nan_problems
from polytask.tasks.probability import ProbabilityMapTask
from polytask.viz import colorize_probability


class EdgeTask(ProbabilityMapTask):
    """Boundary detection with HED-weighted BCE; predictions are boundary probabilities ``(1, H, W)``.

    Targets are float32 ``(1, H, W)`` in {0, 1} (255 = ignore).

    Args:
        name: task name.
        pos_weight: weight of boundary pixels in the HED loss.
    """

    higher_is_better = {"F_tol": True}
    transform_kind = "label"
    is_boundary = True

    def __init__(self, name: str = "edge", pos_weight: float = 0.95) -> None:
        super().__init__(name, 1)
        self.pos_weight = pos_weight

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """HED BCE: output and target ``(B, 1, H, W)``."""
        return losses.hed_bce(output, target, pos_weight=self.pos_weight)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Boundary probability ``(B, 1, H, W)``."""
        return output.float().sigmoid()

    def value_shape(self, size: Size) -> tuple[int, ...]:
        """``(1, H, W)``."""
        return (1, size[0], size[1])

    def target_problems(self, value: torch.Tensor) -> list[tuple[TargetProblemKind, str]]:
        """NaNs, then values outside [0, 1] other than 255."""
        problems = nan_problems(value)
        if bool(((value != IGNORE_INDEX) & ((value < 0) | (value > 1))).any()):
            problems.append(("out_of_range", "boundary values outside [0, 1]"))
        return problems

    def random_target(self, batch_size: int, size: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 1, H, W)`` float32, 1 on about 10 % of the pixels, else 0."""
        return (torch.rand(batch_size, 1, *size, generator=generator) < 0.1).float()

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        self._split_level_only(protocol)
        return BoundaryFMetric()

    def metric_settings(self) -> dict[str, str]:
        """F_tol is the training monitor, not SEISM's odsF."""
        return {self.name: "F_tol: in-training boundary F (2 px tolerance), not SEISM odsF"}

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        return colorize_probability(value.float().cpu().numpy()[0])
