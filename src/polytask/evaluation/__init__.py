"""Offline evaluation of saved predictions: SEISM-equivalent boundary odsF / oisF / AP."""

from polytask.evaluation.boundary import (
    MTINET_THRESHOLDS,
    SEISM_THRESHOLDS,
    BoundaryCounts,
    BoundaryEvaluator,
    BoundaryODSMetric,
    BoundaryResult,
    quantize_probabilities,
    read_prediction_png,
    segmentation_boundaries,
)
from polytask.evaluation.correspondence import PixelMatcher, correspond_pixels
from polytask.ops.thinning import thin
from polytask.evaluation.edge_nms import edge_nms, edge_orientation, seism_nms

__all__ = [
    "MTINET_THRESHOLDS",
    "SEISM_THRESHOLDS",
    "BoundaryCounts",
    "BoundaryEvaluator",
    "BoundaryODSMetric",
    "BoundaryResult",
    "PixelMatcher",
    "correspond_pixels",
    "edge_nms",
    "edge_orientation",
    "quantize_probabilities",
    "read_prediction_png",
    "segmentation_boundaries",
    "seism_nms",
    "thin",
]
