"""Task definitions: what a network predicts for one task and how it is trained, stored and scored.

A :class:`Task` (:mod:`polytask.tasks.base`) owns its output channels, loss, post-processing,
metric and colourisation, and every kind-specific rule the generic layers apply (target checks,
random targets, transform kind, prediction files, resizing, evaluation hooks). One module per
kind; tasks are built by name from the registry (:func:`build_task`); a dataset declares which
tasks it carries with their options (number of classes, class names) and its default loss weights.
"""

from polytask.constants import IGNORE_INDEX
from polytask.tasks.attributes import ALL_ATTRIBUTES, AttributeTask
from polytask.tasks.base import DepthFormat, PredictionFormat, TargetError, TargetKind, TargetProblemKind, Task
from polytask.tasks.classification import ImageClassificationTask
from polytask.tasks.depth import DepthTask
from polytask.tasks.edge import EdgeTask
from polytask.tasks.normals import NormalsTask
from polytask.tasks.probability import ProbabilityMapTask
from polytask.tasks.registry import TASK_REGISTRY, TaskKind, build_task, select_tasks
from polytask.tasks.saliency import SaliencyTask
from polytask.tasks.segmentation import BinarySegmentationTask, SegmentationTask

__all__ = [
    "ALL_ATTRIBUTES",
    "IGNORE_INDEX",
    "TASK_REGISTRY",
    "AttributeTask",
    "BinarySegmentationTask",
    "DepthFormat",
    "DepthTask",
    "EdgeTask",
    "ImageClassificationTask",
    "NormalsTask",
    "PredictionFormat",
    "ProbabilityMapTask",
    "SaliencyTask",
    "SegmentationTask",
    "TargetError",
    "TargetKind",
    "TargetProblemKind",
    "Task",
    "TaskKind",
    "build_task",
    "select_tasks",
]
