"""The routed multi-task network: a (possibly task-routed) trunk and one head per task, and the
registration of an architecture's routing variants."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from polytask.models.base import MultiTaskNet, register_model
from polytask.models.etr_nlp.conversion import Routing, RoutingKind, route_modules
from polytask.models.etr_nlp.layers import RoutedConv, TaskBatchNorm, TaskBranch
from polytask.models.etr_nlp.nlp import NLPOptions, onednn_mixes
from polytask.models.etr_nlp.stacked_batch import TaskRouter
from polytask.tasks import Task

TaskBatching = Literal["auto", "stacked", "loop"]
"""How :meth:`RoutedNet.forward` runs the paths of several tasks: see :func:`choose_task_batching`."""

LOOP_ABOVE_ELEMENTS = 3_000_000
"""``auto`` loops over the tasks of a CPU training step when the first layer's stacked output would
hold more elements than this (3 M: 12 MB in float32); measured with
``benchmarks/etr_nlp_task_batching.py`` (benchmarks/RESULTS.md)."""


def choose_task_batching(
    mode: TaskBatching, images: torch.Tensor, num_tasks: int, first_layer: tuple[int, int]
) -> Literal["stacked", "loop"]:
    """The way :meth:`RoutedNet.forward` runs ``num_tasks`` task paths on ``images`` ``(B, 3, H, W)``.

    ``stacked``: the task paths in one call, their images stacked along the batch axis;
    ``loop``: one call per task. Both give the same outputs and gradients (equal in float64).
    ``auto`` loops only in a CPU training step (autograd recording) whose first layer's stacked
    output, ``num_tasks * B * (H / s) * (W / s) * C`` elements for a first convolution of ``C``
    channels and stride ``s`` (``first_layer = (C, s)``), exceeds :data:`LOOP_ABOVE_ELEMENTS`:
    there oneDNN runs the larger batch slower than separate calls (up to 1.6x). Inference and
    smaller steps stay stacked, which is as fast or faster on a CPU, and so is every step on an
    accelerator, where a larger batch keeps the device busy (our assumption, measured by
    ``benchmarks/gpu_check.sh`` when a GPU is available).
    """
    if mode != "auto":
        return mode
    if images.device.type != "cpu" or not torch.is_grad_enabled():
        return "stacked"
    elements = stacked_first_layer_elements(images.shape, num_tasks, first_layer)
    return "loop" if elements > LOOP_ABOVE_ELEMENTS else "stacked"


def stacked_first_layer_elements(image_shape: Sequence[int], num_tasks: int, first_layer: tuple[int, int]) -> int:
    """Elements of the first layer's output when ``num_tasks`` paths of images ``(B, 3, H, W)`` are
    stacked: ``num_tasks * B * ceil(H / s) * ceil(W / s) * C`` for ``first_layer = (C, s)``."""
    batch, _, height, width = image_shape
    channels, stride = first_layer
    return num_tasks * batch * -(-height // stride) * -(-width // stride) * channels


def first_convolution(trunk: nn.Module) -> tuple[int, int]:
    """``(output channels, stride)`` of the first ``Conv2d`` of ``trunk`` (in registration order);
    ``(3, 1)`` if it has none."""
    conv = next((m for m in trunk.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return 3, 1
    return conv.out_channels, conv.stride[0]


class RoutedNet(MultiTaskNet):
    """A trunk ``(B, 3, H, W) -> (B, C, h, w)`` routed by :class:`Routing`, and per-task heads.

    An architecture (:class:`~polytask.models.etr_nlp.segnet.RoutedSegNet`,
    :class:`~polytask.models.etr_nlp.resnet.RoutedResNet`) builds its plain trunk and heads and
    passes its routing options on (``**routing_options``) unchanged.

    Forward modes:

    * per-task (:meth:`forward_task`): the trunk runs the path of one task, then its head;
    * batched (:meth:`forward_tasks`): the paths of several tasks run in one call, their images
      stacked along the batch axis (task convolutions as one grouped convolution, batch norm
      statistics per task block); the outputs equal those of the per-task mode;
    * all tasks (``forward``): batched, or a loop over the per-task mode, as ``task_batching``
      says (:func:`choose_task_batching`); same outputs and gradients either way.

    A network whose trunk is shared (``hard_sharing``, ``nlp``) runs the trunk once for all heads.

    Args:
        tasks: the tasks to predict.
        trunk: the plain trunk; its layers are replaced in place (:func:`route_modules`).
        heads: one module per task name, ``head(features (B, C, h, w), size) -> output``.
        init_conv: initialisation of the learnable convolutions created by the routing.
        routing: the routing kind: ``etr_nlp`` (ETR-NLP), ``etr``, ``nlp`` (its two ablations),
            ``task_routing``, ``hard_sharing``, ``single_task`` (baselines); see :class:`Routing`.
        gamma: sharing ratio (``etr_nlp``, ``etr``; default 0.9); ``nlp``: the ETR-NLP ratio whose
            mix groups it copies.
        nlp: NLP options (``etr_nlp``, ``nlp`` only).
        active_ratio: channels kept per task (``task_routing`` only; default 0.5).
        seed: seed of the primitives and masks.
        task_branch: ETR-NLP's task-specific branch, ``nlp`` (default) or ``conv`` (``etr_nlp`` only).
        task_batching: how ``forward`` runs the task paths: ``auto`` (default), ``stacked`` or
            ``loop`` (:func:`choose_task_batching`); no effect when the trunk is shared.

    The network's ``routing`` attribute is the :class:`Routing` (the kind and its options, defaults filled in).
    """

    per_task_mode: ClassVar[bool] = True

    def __init__(
        self,
        tasks: Sequence[Task],
        trunk: nn.Module,
        heads: Mapping[str, nn.Module],
        init_conv: Callable[[nn.Conv2d], None],
        *,
        routing: RoutingKind = "etr_nlp",
        gamma: float | None = None,
        nlp: NLPOptions | None = None,
        active_ratio: float | None = None,
        seed: int = 0,
        task_branch: TaskBranch | None = None,
        task_batching: TaskBatching = "auto",
    ) -> None:
        super().__init__(tasks)
        if set(heads) != set(self.task_names):
            raise ValueError(f"heads {sorted(heads)} do not match the tasks {self.task_names}")
        if task_batching not in get_args(TaskBatching):
            raise ValueError(f"task_batching must be one of {get_args(TaskBatching)}, got {task_batching!r}")
        self.task_batching = task_batching
        self.first_layer = first_convolution(trunk)
        self.routing = Routing(routing, gamma, nlp, active_ratio, seed, task_branch)
        self.router = TaskRouter(len(self.tasks))
        self.task_index = {name: i for i, name in enumerate(self.task_names)}
        route_modules(trunk, self.router, self.routing, init_conv)
        self.trunk = trunk
        self.heads = nn.ModuleDict({name: heads[name] for name in self.task_names})

    def forward_tasks(self, images: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Outputs of the tasks ``names`` in one call: ``(B, 3, H, W)`` -> ``{task: (B, C_t, H, W) or (B, C_t)}``."""
        size = images.shape[-2:]
        unknown = [n for n in names if n not in self.task_index]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks: {self.task_names}")
        if not self.routing.task_conditioned:
            features = self.trunk(self._trunk_layout(images))
            return {name: self.heads[name](features, size).contiguous() for name in names}
        with self.router.route([self.task_index[n] for n in names]):
            features = self.trunk(self._trunk_layout(images.repeat(len(names), 1, 1, 1)))
        return {name: self.heads[name](block, size).contiguous() for name, block in zip(names, features.chunk(len(names)))}

    def _trunk_layout(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in the memory layout the trunk runs fastest in: channels-last where the NLP
        blocks' mixes (and NLP task branches) run as oneDNN convolutions (:func:`onednn_mixes`),
        else unchanged. The layout follows through the trunk; the heads' outputs are made contiguous."""
        if self.routing.nlp is not None and self.routing.task_branch != "conv" and onednn_mixes(images):
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def forward_task(self, images: torch.Tensor, name: str) -> torch.Tensor:
        """Per-task mode: only the path and head of task ``name``; ``(B, 3, H, W)`` -> its output."""
        return self.forward_tasks(images, [name])[name]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """All tasks, stacked or in a loop as ``task_batching`` says: ``(B, 3, H, W)`` -> ``{task: output}``."""
        if self.runs_tasks_apart(images):
            return {name: self.forward_task(images, name) for name in self.task_names}
        return self.forward_tasks(images, self.task_names)

    def runs_tasks_apart(self, images: torch.Tensor) -> bool:
        """True when the task paths differ (task-conditioned routing) and ``task_batching`` loops
        for ``images`` (:func:`choose_task_batching`)."""
        mode = choose_task_batching(self.task_batching, images, len(self.task_names), self.first_layer)
        return self.routing.task_conditioned and mode == "loop"

    @property
    def display_name(self) -> str:
        """The class name and the routing kind, e.g. ``RoutedSegNet[etr_nlp]``."""
        return f"{type(self).__name__}[{self.routing.kind}]"

    def shared_backbone(self) -> nn.Module:
        """The routed trunk (``(B, 3, H, W)`` -> ``(B, C, h, w)``); alone, it runs its first task's path."""
        return self.trunk

    def shared_representation_module(self) -> nn.Module | None:
        """The trunk when every task reads its one output (hard-sharing routing); None when the
        trunk has task-specific channels."""
        return None if self.routing.task_conditioned else self.trunk

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trunk's shared trainable parameters (``param_groups()["shared"]``: not the task
        convolutions, task batch norms or heads)."""
        return self.param_groups()["shared"]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: ``shared`` trunk, ``task_specific`` trunk (task convs, task norms), ``heads``."""
        specific: dict[int, nn.Parameter] = {}
        for module in self.trunk.modules():
            if isinstance(module, TaskBatchNorm):
                specific.update({id(p): p for p in module.parameters()})
            elif isinstance(module, RoutedConv) and module.task_convs is not None:
                specific.update({id(p): p for p in module.task_convs.parameters()})
        trunk = [p for p in self.trunk.parameters() if p.requires_grad]
        return {
            "shared": [p for p in trunk if id(p) not in specific],
            "task_specific": [p for p in trunk if id(p) in specific],
            "heads": [p for p in self.heads.parameters() if p.requires_grad],
        }


def register_routing_variants(architecture: type[RoutedNet], suffix: str) -> None:
    """Register ``architecture`` once per routing kind as ``<kind>_<suffix>`` (timm style: one class, one function a variant).

    The network ``<kind>_<suffix>`` is ``architecture(tasks, routing=<kind>, **options)``, e.g.
    ``hard_sharing_segnet`` is ``RoutedSegNet(tasks, routing="hard_sharing", **options)``.

    Args:
        architecture: a :class:`RoutedNet` whose constructor takes the tasks and ``routing``.
        suffix: the architecture's name in the registry (``segnet``).
    """
    for kind in get_args(RoutingKind):
        register_model(f"{kind}_{suffix}")(_variant(architecture, kind, f"{kind}_{suffix}"))


def _variant(architecture: type[RoutedNet], kind: RoutingKind, name: str) -> Callable[..., RoutedNet]:
    """``(tasks, **options) -> architecture(tasks, routing=kind, **options)``, named ``name``."""

    def build(tasks: Sequence[Task], **options: Any) -> RoutedNet:
        return architecture(tasks, routing=kind, **options)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"``{architecture.__name__}(tasks, routing={kind!r}, **options)`` (routing kinds: :class:`Routing`)."
    return build
