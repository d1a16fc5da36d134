"""The routing kinds (what each makes of a convolution and a batch norm), and the conversion of a plain
network's layers into task-routed ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from torch import nn

from polytask.models.etr_nlp.layers import BlockBatchNorm, RoutedConv, TaskBatchNorm, TaskBranch, TaskChannelMask
from polytask.models.etr_nlp.nlp import NLPOptions
from polytask.models.etr_nlp.primitives import derive_seed
from polytask.models.etr_nlp.stacked_batch import TaskRouter

RoutingKind = Literal["etr_nlp", "etr", "nlp", "task_routing", "hard_sharing", "single_task"]
"""The routing kinds; a routed network of kind ``k`` is registered as ``<k>_<architecture>`` (``hard_sharing_segnet``)."""

DEFAULT_GAMMA = 0.9
DEFAULT_ACTIVE_RATIO = 0.5
DEFAULT_TASK_BRANCH: TaskBranch = "nlp"

_USES_GAMMA = frozenset({"etr_nlp", "etr", "nlp"})
_USES_NLP = frozenset({"etr_nlp", "nlp"})
_TASK_CONDITIONED = frozenset({"etr_nlp", "etr", "task_routing", "single_task"})


@dataclass(frozen=True)
class Routing:
    """How a network's convolutions and batch norms become task-routed.

    ================  ===================================================================================
    kind              every ``Conv2d`` becomes                       every ``BatchNorm2d`` becomes
    ================  ===================================================================================
    ``etr_nlp``       NLP shared branch (gamma) + task branches      per-task batch norm
                      (``task_branch``: 1x1 mixes of the primitive
                      responses, or convolutions)
    ``etr``           learnable shared conv (gamma) + task convs     per-task batch norm
    ``nlp``           NLP block only (all channels shared), mix      unchanged (the network stays shared)
                      grouped as ETR-NLP's shared mix at ``gamma``
    ``task_routing``  unchanged (learnable, shared)                  one shared batch norm (statistics per
                                                                     task block), then a fixed random
                                                                     per-task channel mask
    ``hard_sharing``  unchanged                                      unchanged
    ``single_task``   task convs only (gamma = 0)                    per-task batch norm: one independent
                                                                     network per task
    ================  ===================================================================================

    Attributes:
        kind: the routing kind.
        gamma: sharing ratio (``etr_nlp``, ``etr``; default 0.9); for ``nlp`` the ratio of the
            ETR-NLP arm whose shared-mix groups its NLP blocks copy (its blocks still output
            every channel).
        nlp: NLP options (``etr_nlp`` and ``nlp`` only; default :class:`NLPOptions`).
        active_ratio: channels each task keeps (``task_routing`` only; default 0.5; Maximum
            Roaming's configs: CelebA 0.9, NYUv2 0.8, Cityscapes 0.6).
        task_branch: ``nlp`` or ``conv`` (``etr_nlp`` only; default ``nlp``), see
            :class:`~polytask.models.etr_nlp.layers.RoutedConv`.
        seed: seed of every primitive and mask (derived per layer from its qualified name).
    """

    kind: RoutingKind = "etr_nlp"
    gamma: float | None = None
    nlp: NLPOptions | None = None
    active_ratio: float | None = None
    seed: int = 0
    task_branch: TaskBranch | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(RoutingKind):
            raise ValueError(f"unknown routing kind {self.kind!r}; kinds: {list(get_args(RoutingKind))}")
        for name, users, default in (
            ("gamma", _USES_GAMMA, DEFAULT_GAMMA),
            ("nlp", _USES_NLP, NLPOptions()),
            ("active_ratio", {"task_routing"}, DEFAULT_ACTIVE_RATIO),
            ("task_branch", {"etr_nlp"}, DEFAULT_TASK_BRANCH),
        ):
            value = getattr(self, name)
            if self.kind not in users and value is not None:
                raise ValueError(f"routing {self.kind!r} has no {name!r} option (only {sorted(users)} use it)")
            if self.kind in users and value is None:
                object.__setattr__(self, name, default)

    @property
    def task_conditioned(self) -> bool:
        """True when features depend on the task (each task has its own path through the trunk)."""
        return self.kind in _TASK_CONDITIONED

    def conv_gamma(self) -> float | None:
        """Sharing ratio of the routed convolutions, or None when convolutions stay unchanged."""
        return {"etr_nlp": self.gamma, "etr": self.gamma, "nlp": 1.0, "single_task": 0.0}.get(self.kind)

    def mix_gamma(self) -> float | None:
        """The sharing ratio whose shared-mix groups the NLP blocks take (``nlp``: ``gamma``; others: their own ratio)."""
        return self.gamma if self.kind == "nlp" else None


def route_modules(root: nn.Module, router: TaskRouter, routing: Routing, init_conv: Callable[[nn.Conv2d], None]) -> None:
    """Replace, in place, the ``Conv2d`` and ``BatchNorm2d`` layers of ``root`` as ``routing`` says.

    Args:
        root: the plain network (e.g. a SegNet or a timm ResNet).
        router: the task router the new layers read.
        routing: the routing.
        init_conv: initialisation of every new learnable ``Conv2d`` (the host network's scheme).
    """
    gamma = routing.conv_gamma()
    shared_branch = "conv" if routing.kind == "etr" else "nlp"
    task_branch = routing.task_branch or "conv"
    for parent_name, parent in list(root.named_modules()):
        for name, child in list(parent.named_children()):
            qualified = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, nn.Conv2d) and gamma is not None:
                nlp = routing.nlp or NLPOptions()
                routed = RoutedConv.from_conv(
                    child, router, gamma, shared_branch, nlp, derive_seed(routing.seed, qualified), task_branch, routing.mix_gamma()
                )
                for module in routed.modules():
                    if isinstance(module, nn.Conv2d):
                        init_conv(module)
                setattr(parent, name, routed)
            elif isinstance(child, nn.BatchNorm2d) and routing.kind == "task_routing":
                assert routing.active_ratio is not None
                mask = TaskChannelMask(router, child.num_features, routing.active_ratio, derive_seed(routing.seed, qualified))
                setattr(parent, name, nn.Sequential(BlockBatchNorm.from_batchnorm(child, router), mask))
            elif isinstance(child, nn.BatchNorm2d) and routing.task_conditioned:
                setattr(parent, name, TaskBatchNorm.from_batchnorm(child, router))
