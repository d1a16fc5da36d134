"""Tasks by kind name: the registry datasets and configs build their tasks from."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from polytask.tasks.attributes import AttributeTask
from polytask.tasks.base import Task
from polytask.tasks.classification import ImageClassificationTask
from polytask.tasks.depth import DepthTask
from polytask.tasks.edge import EdgeTask
from polytask.tasks.normals import NormalsTask
from polytask.tasks.saliency import SaliencyTask
from polytask.tasks.segmentation import BinarySegmentationTask, SegmentationTask


@dataclass(frozen=True)
class TaskKind:
    """A registered kind of task: the class it builds and the options it fills in.

    Calling it builds a task: ``TaskKind(cls, defaults)(**options)`` is
    ``cls(**{**defaults, **options})``.

    Attributes:
        task_class: the :class:`Task` subclass.
        defaults: options given unless the caller gives them (e.g. the default task name).
    """

    task_class: type[Task]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, **options: Any) -> Task:
        return self.task_class(**{**self.defaults, **options})

    def options(self) -> frozenset[str]:
        """The options a task of this kind is built with (its class's constructor arguments)."""
        return frozenset(inspect.signature(self.task_class).parameters)


TASK_REGISTRY: dict[str, TaskKind] = {
    "semseg": TaskKind(SegmentationTask, {"name": "semseg"}),
    "human_parts": TaskKind(SegmentationTask, {"name": "human_parts", "balances_crops": False, "ignores_empty": True}),
    "binary_seg": TaskKind(BinarySegmentationTask),
    "sal": TaskKind(SaliencyTask),
    "normals": TaskKind(NormalsTask),
    "edge": TaskKind(EdgeTask),
    "depth": TaskKind(DepthTask),
    "attributes": TaskKind(AttributeTask),
    "classification": TaskKind(ImageClassificationTask),
}


def build_task(kind: str, **options: object) -> Task:
    """Build a task of a registered kind.

    Args:
        kind: one of ``TASK_REGISTRY`` (semseg, human_parts, binary_seg, sal, normals, edge, depth,
            attributes, classification).
        options: the task's constructor arguments (e.g. ``num_classes``, ``class_names``, ``name``).
    """
    if kind not in TASK_REGISTRY:
        raise ValueError(f"unknown task kind {kind!r}; known kinds: {sorted(TASK_REGISTRY)}")
    try:
        return TASK_REGISTRY[kind](**options)
    except TypeError as err:
        raise TypeError(f"task kind {kind!r}: bad options {sorted(options)}: {err}") from err


def select_tasks(available: Sequence[Task], names: Sequence[str] | None, source: str) -> list[Task]:
    """Keep the tasks named in ``names`` (all when None), in the given order.

    Raises:
        ValueError: a name is not among ``available``; the message names ``source`` (the dataset).
    """
    by_name = {t.name: t for t in available}
    if names is None:
        return list(available)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"{source} does not carry task(s) {unknown}; it carries {list(by_name)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {list(names)}")
    return [by_name[n] for n in names]
