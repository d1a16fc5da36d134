"""Groups of binary image-level attributes (e.g. the CelebA groups)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric

from polytask import losses
from polytask.metrics import AttributeMetric, MaximumRoamingAttributeMetric, MetricProtocol, check_protocol
from polytask.tasks.base import Size, TargetProblemKind, Task
from polytask.viz import colorize_probability

ALL_ATTRIBUTES = "attributes"
"""Results key of the metrics averaged over every attribute of every attribute-group task."""


class AttributeTask(Task):
    """A group of ``K`` binary image-level attributes.

    Targets are float32 ``(K,)`` in {0, 1}; predictions are probabilities ``(K,)``. There is no
    prediction file format.

    Args:
        name: task name (the group).
        attribute_names: the ``K`` attributes.
    """

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

    def value_shape(self, size: Size) -> tuple[int, ...]:
        """``(K,)`` whatever the image size."""
        return (self.out_channels,)

    def target_problems(self, value: torch.Tensor) -> list[tuple[TargetProblemKind, str]]:
        """Values other than 0 and 1."""
        if bool(((value != 0) & (value != 1)).any()):
            return [("out_of_range", "attribute values other than 0 / 1")]
        return []

    def random_target(self, batch_size: int, size: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform {0, 1} ``(B, K)`` float32."""
        return torch.randint(0, 2, (batch_size, self.out_channels), generator=generator).float()

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        if check_protocol(protocol) == "maximum_roaming":
            return MaximumRoamingAttributeMetric(self.out_channels)
        return AttributeMetric(self.out_channels)

    @classmethod
    def joint_results(cls, metrics: Sequence[Metric]) -> dict[str, dict[str, float]]:
        """``{ALL_ATTRIBUTES: {metric: value}}``: precision, recall, F1 and accuracy averaged over
        every attribute of every group, as CelebA results are reported (none without attribute metrics)."""
        per_attribute: dict[str, list[torch.Tensor]] = {}
        for metric in metrics:
            if isinstance(metric, AttributeMetric):
                for key, tensor in metric.per_attribute().items():
                    per_attribute.setdefault(key, []).append(tensor.flatten())
        if not per_attribute:
            return {}
        return {ALL_ATTRIBUTES: {k: float(torch.cat(v).double().mean()) for k, v in per_attribute.items()}}

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        """A row of ``K`` 16x16 cells, white where the attribute is present (probability > 0.5)."""
        row = (value.float().cpu().numpy().reshape(1, -1) > 0.5).astype(np.float32)
        return colorize_probability(np.repeat(np.repeat(row, 16, axis=0), 16, axis=1))
