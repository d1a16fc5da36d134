"""Task definitions (the former ``polytask/tasks.py``, now ``polytask.tasks.base``; split by kind next)."""

from polytask.tasks.base import (
    IGNORE_INDEX,
    TASK_REGISTRY,
    AttributeTask,
    BinarySegmentationTask,
    DepthTask,
    EdgeTask,
    ImageClassificationTask,
    NormalsTask,
    SaliencyTask,
    SegmentationTask,
    Task,
    build_task,
    select_tasks,
)

__all__ = [
    "IGNORE_INDEX",
    "TASK_REGISTRY",
    "AttributeTask",
    "BinarySegmentationTask",
    "DepthTask",
    "EdgeTask",
    "ImageClassificationTask",
    "NormalsTask",
    "SaliencyTask",
    "SegmentationTask",
    "Task",
    "build_task",
    "select_tasks",
]
