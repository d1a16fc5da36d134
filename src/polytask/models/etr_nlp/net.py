"""The routed multi-task network: a (possibly task-routed) trunk and one head per task, and the
registration of an architecture's routing variants."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, get_args

import torch
from torch import nn

from polytask.models.base import MultiTaskNet, register_model
from polytask.models.etr_nlp.conversion import Routing, RoutingKind, route_modules
from polytask.models.etr_nlp.layers import RoutedConv, TaskBatchNorm, TaskBranch
from polytask.models.etr_nlp.nlp import NLPOptions
from polytask.models.etr_nlp.stacked_batch import TaskRouter
from polytask.tasks import Task


class RoutedNet(MultiTaskNet):
    """A trunk ``(B, 3, H, W) -> (B, C, h, w)`` routed by :class:`Routing`, and per-task heads.

    An architecture (:class:`~polytask.models.etr_nlp.segnet.RoutedSegNet`,
    :class:`~polytask.models.etr_nlp.resnet.RoutedResNet`) builds its plain trunk and heads and
    passes its routing options on (``**routing_options``) unchanged.

    Forward modes:

    * per-task (:meth:`forward_task`): the trunk runs the path of one task, then its head;
    * batched (:meth:`forward_tasks`, and ``forward``): the paths of several tasks run in one
      call, their images stacked along the batch axis (task convolutions as one grouped
      convolution, batch norm statistics per task block); the outputs equal those of the
      per-task mode.

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
    ) -> None:
        super().__init__(tasks)
        if set(heads) != set(self.task_names):
            raise ValueError(f"heads {sorted(heads)} do not match the tasks {self.task_names}")
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
            features = self.trunk(images)
            return {name: self.heads[name](features, size) for name in names}
        with self.router.route([self.task_index[n] for n in names]):
            features = self.trunk(images.repeat(len(names), 1, 1, 1))
        return {name: self.heads[name](block, size) for name, block in zip(names, features.chunk(len(names)))}

    def forward_task(self, images: torch.Tensor, name: str) -> torch.Tensor:
        """Per-task mode: only the path and head of task ``name``; ``(B, 3, H, W)`` -> its output."""
        return self.forward_tasks(images, [name])[name]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """All tasks in the batched mode: ``(B, 3, H, W)`` -> ``{task: output}``."""
        return self.forward_tasks(images, self.task_names)

    @property
    def display_name(self) -> str:
        """The class name and the routing kind, e.g. ``RoutedSegNet[etr_nlp]``."""
        return f"{type(self).__name__}[{self.routing.kind}]"

    def shared_backbone(self) -> nn.Module:
        """The routed trunk (``(B, 3, H, W)`` -> ``(B, C, h, w)``); alone, it runs its first task's path."""
        return self.trunk

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
