"""The interface every multi-task network implements, and the model registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from polytask.tasks import Task

MODEL_REGISTRY: dict[str, Callable[..., MultiTaskNet]] = {}
"""Registered networks by name: a network class, or a function ``(tasks, **options) -> network`` (a variant)."""


class MultiTaskNet(nn.Module):
    """Base class: ``forward(images (B, 3, H, W)) -> {task name: raw output}``.

    Dense outputs are ``(B, task.out_channels, H, W)`` at the input size; image-level ones
    ``(B, task.out_channels)``.

    Args:
        tasks: the tasks to predict (from the datamodule).
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        self.tasks = list(tasks)

    @property
    def task_names(self) -> list[str]:
        """Names of the predicted tasks, in order."""
        return [t.name for t in self.tasks]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by component (for summaries); subclasses refine it."""
        return {"all": [p for p in self.parameters() if p.requires_grad]}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


NetworkFactory = TypeVar("NetworkFactory", bound=Callable[..., MultiTaskNet])


def register_model(name: str) -> Callable[[NetworkFactory], NetworkFactory]:
    """Decorator adding a network class, or a function building a network from the tasks and options
    (a variant of a class, timm style), to ``MODEL_REGISTRY`` under ``name``."""

    def wrap(factory: NetworkFactory) -> NetworkFactory:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        MODEL_REGISTRY[name] = factory
        return factory

    return wrap


def create_model(name: str, tasks: Sequence[Task], **options: object) -> MultiTaskNet:
    """Instantiate a registered network by name."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](tasks, **options)
