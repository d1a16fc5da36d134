"""The interface every multi-task network implements, and the model registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

import torch
from torch import nn

from polytask.tasks import Task

MODEL_REGISTRY: dict[str, Callable[..., MultiTaskNet]] = {}
"""Registered networks by name: a network class, or a function ``(tasks, **options) -> network`` (a variant)."""


class MultiTaskNet(nn.Module):
    """Base class: ``forward(images (B, 3, H, W)) -> {task name: raw output}``.

    Dense outputs are ``(B, task.out_channels, H, W)`` at the input size; image-level ones
    ``(B, task.out_channels)``.

    Besides ``forward``, the interface the rest of polytask relies on (training, benchmarking,
    summaries), with defaults a network overrides when it has the capability:

    * :attr:`image_size`: the input size the network is built for (e.g. a ViT's position grid);
    * :attr:`per_task_mode` and :meth:`forward_task`: one task's path alone (ETR-NLP's routed nets);
    * :meth:`aux_loss`: an extra loss of the last forward pass (TaskExpert's load balancing);
    * :meth:`shared_backbone`: the feature extractor shared by the tasks, which the benchmark's
      bare-network reference runs alone;
    * :meth:`param_groups`: trainable parameters by component, for summaries;
    * :meth:`shared_parameters`: the trainable parameters every task's loss depends on (the task
      interference diagnostics compare the tasks' gradients on them).

    Args:
        tasks: the tasks to predict (from the datamodule).
    """

    image_size: tuple[int, int] | None = None
    """``(H, W)`` the network is built for, or None when it takes any size."""

    per_task_mode: ClassVar[bool] = False
    """Whether :meth:`forward_task` computes one task's path alone (cheaper than ``forward``)."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        self.tasks = list(tasks)

    @property
    def display_name(self) -> str:
        """The network's name in reports: its class name, plus its variant where one class has several."""
        return type(self).__name__

    @property
    def task_names(self) -> list[str]:
        """Names of the predicted tasks, in order."""
        return [t.name for t in self.tasks]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by component (for summaries); subclasses refine it."""
        return {"all": [p for p in self.parameters() if p.requires_grad]}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_task(self, images: torch.Tensor, name: str) -> torch.Tensor:
        """Raw output of task ``name`` for ``images`` ``(B, 3, H, W)``: the full forward's entry,
        unless the network has a per-task mode (:attr:`per_task_mode`)."""
        return self(images)[name]

    def aux_loss(self) -> torch.Tensor | None:
        """An extra loss of the last forward pass, already weighted, added to the training total
        (a scalar tensor), or None (the default: no extra loss)."""
        return None

    def runs_tasks_apart(self, images: torch.Tensor) -> bool:
        """True when :meth:`forward` would run the task paths one after another for ``images``
        ``(B, 3, H, W)``, each through :meth:`forward_task`; a training step can then back-propagate
        each task's loss before the next task's forward and hold one path's activations at a time.
        False by default (the tasks share one forward)."""
        return False

    def shared_representation_module(self) -> nn.Module | None:
        """The module whose output (one tensor) is the only input every task head reads from the
        shared parameters, or None when the network has no such representation (the default).

        Every path from :meth:`shared_parameters` to a task output passes through this output, so the
        representation form of gradient aggregation can work on its Jacobian."""
        return None

    def shared_backbone(self) -> nn.Module | None:
        """The feature extractor shared by every task (``(B, 3, H, W)`` -> feature maps or tokens),
        or None when the network has none that runs alone."""
        return None

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters shared by every task: by default those of
        :meth:`shared_backbone` (none when it is None); networks with more shared parts extend it."""
        backbone = self.shared_backbone()
        return [] if backbone is None else [p for p in backbone.parameters() if p.requires_grad]


def forward_on_patch_grid(
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]], images: torch.Tensor, patch: Sequence[int] | None
) -> dict[str, torch.Tensor]:
    """``forward(images)`` for a network whose input must be a multiple of ``patch`` ``(h, w)`` (a ViT's
    patch size; None: any size).

    ``images`` ``(B, 3, H, W)`` off the grid are padded with zeros at the bottom and right (the mean
    colour of normalised images) to the next multiple, and the dense outputs ``(B, C, H', W')`` are
    cropped back to ``(H, W)``, so every pixel keeps its place on the token grid; image-level
    outputs ``(B, C)`` are returned as they are.
    """
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height % patch[0], -width % patch[1]) if patch is not None else (0, 0)
    if not (pad_h or pad_w):
        return forward(images)
    outputs = forward(torch.nn.functional.pad(images, (0, pad_w, 0, pad_h)))
    return {name: out[..., :height, :width] if out.dim() == 4 else out for name, out in outputs.items()}


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
