"""Evaluation metrics (torchmetrics) and the multi-task gain Delta_m.

The default, split-level metrics accumulate their counts over all ``update`` calls of a split
(never averages of per-image scores) in states that are summed across processes. The
``maximum_roaming`` protocol (:mod:`polytask.metrics.maximum_roaming`) reproduces Maximum
Roaming's scripts instead, per-batch averages included. ``compute()`` returns a
``dict[str, Tensor]`` of scalars.
"""

from polytask.metrics.attributes import AttributeMetric
from polytask.metrics.edge import BoundaryFMetric
from polytask.metrics.classification import ClassificationAccuracy
from polytask.metrics.delta import delta_m, load_reference
from polytask.metrics.depth import DepthMetric
from polytask.metrics.maximum_roaming import (
    MaximumRoamingAttributeMetric,
    MaximumRoamingDepthMetric,
    MaximumRoamingNormalsMetric,
    MaximumRoamingSegmentationMetric,
)
from polytask.metrics.normals import NormalsMetric
from polytask.metrics.protocol import METRIC_PROTOCOLS, MetricProtocol, check_protocol, protocol_setting
from polytask.metrics.saliency import SaliencyMetric
from polytask.metrics.segmentation import SegmentationMetric

__all__ = [
    "AttributeMetric",
    "BoundaryFMetric",
    "ClassificationAccuracy",
    "DepthMetric",
    "METRIC_PROTOCOLS",
    "MaximumRoamingAttributeMetric",
    "MaximumRoamingDepthMetric",
    "MaximumRoamingNormalsMetric",
    "MaximumRoamingSegmentationMetric",
    "MetricProtocol",
    "NormalsMetric",
    "SaliencyMetric",
    "SegmentationMetric",
    "check_protocol",
    "delta_m",
    "load_reference",
    "protocol_setting",
]
