"""Multi-class image-level classification."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from polytask.metrics import ClassificationAccuracy, MetricProtocol
from polytask.tasks.base import Size, TargetProblemKind, Task, class_id_problems
from polytask.viz import colorize_probability


class ImageClassificationTask(Task):
    """Multi-class image-level classification: output ``(B, C)`` logits, target ``(B,)`` class ids.

    A sample's target and prediction are 0-dim int64 class ids; there is no prediction file format.

    Args:
        name: task name.
        num_classes: ``C``.
    """

    dense = False
    higher_is_better = {"accuracy": True}
    target_dtype = torch.int64

    def __init__(self, name: str, num_classes: int) -> None:
        super().__init__(name, num_classes)
        self.num_classes = num_classes

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy: output ``(B, C)``, target ``(B,)``."""
        return F.cross_entropy(output.float(), target.long())

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Predicted class ids ``(B,)`` int64."""
        return output.argmax(dim=1)

    def value_shape(self, size: Size) -> tuple[int, ...]:
        """``()``: one class id whatever the image size."""
        return ()

    def target_problems(self, value: torch.Tensor) -> list[tuple[TargetProblemKind, str]]:
        """Class ids outside ``0..C-1`` (no ignore value)."""
        return class_id_problems(value, self.num_classes, ignore=False)

    def random_target(self, batch_size: int, size: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform class ids ``(B,)`` int64."""
        return torch.randint(0, self.num_classes, (batch_size,), generator=generator)

    def _prediction_problem(self, value: torch.Tensor) -> str | None:
        if value.is_floating_point():
            return f"expected an integer class id, got {value.dtype}"
        if not 0 <= int(value) < self.num_classes:
            return f"class id {int(value)} outside 0..{self.num_classes - 1}"
        return None

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        self._split_level_only(protocol)
        return ClassificationAccuracy()

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        """A row of ``C`` 16x16 cells, the cell of the class ``value`` (0-dim) white."""
        row = np.zeros((1, self.num_classes), dtype=np.float32)
        row[0, int(value)] = 1.0
        return colorize_probability(np.repeat(np.repeat(row, 16, axis=0), 16, axis=1))
