"""Split-level evaluation metrics (torchmetrics) and the multi-task gain Delta_m.

Every metric accumulates its counts over all ``update`` calls of a split (never averages of
per-image scores) in states that are summed across processes, and ``compute()`` returns a
``dict[str, Tensor]`` of scalars.
"""

from polytask.metrics.attributes import AttributeMetric
from polytask.metrics.boundary import BoundaryFMetric
from polytask.metrics.classification import ClassificationAccuracy
from polytask.metrics.delta import delta_m, load_reference
from polytask.metrics.depth import DepthMetric
from polytask.metrics.normals import NormalsMetric
from polytask.metrics.saliency import SaliencyMetric
from polytask.metrics.segmentation import SegmentationMetric

__all__ = [
    "AttributeMetric",
    "BoundaryFMetric",
    "ClassificationAccuracy",
    "DepthMetric",
    "NormalsMetric",
    "SaliencyMetric",
    "SegmentationMetric",
    "delta_m",
    "load_reference",
]
