"""ETR-NLP (Ding et al., CVPR 2023): explicit task routing with non-learnable primitives, and its baselines.

Importing this package registers the networks ``etr_nlp_resnet18``, ``etr_nlp_segnet``,
``etr_nlp_timm_resnet`` and the baselines ``{etr, nlp, task_routing, hard_sharing,
single_task}_{resnet18, segnet}`` in :data:`polytask.models.MODEL_REGISTRY`.
"""

from polytask.models.etr_nlp.layers import BlockBatchNorm, ETRNLPModule, RoutedConv, TaskBatchNorm, TaskChannelMask
from polytask.models.etr_nlp.net import RoutedNet
from polytask.models.etr_nlp.nlp import NLPBlock, NLPOptions
from polytask.models.etr_nlp.primitives import DEFAULT_PRIMITIVES, PRIMITIVES, build_primitive
from polytask.models.etr_nlp.resnet import (
    ETRNLPResNet18,
    ETRNLPTimmResNet,
    ETRResNet18,
    HardSharingResNet18,
    NLPResNet18,
    RoutedResNet,
    SingleTaskResNet18,
    TaskRoutingResNet18,
)
from polytask.models.etr_nlp.router import TaskRouter
from polytask.models.etr_nlp.routing import Routing, route_modules
from polytask.models.etr_nlp.segnet import (
    ETRNLPSegNet,
    ETRSegNet,
    HardSharingSegNet,
    NLPSegNet,
    RoutedSegNet,
    SegNetTrunk,
    SingleTaskSegNet,
    TaskRoutingSegNet,
)

__all__ = [
    "BlockBatchNorm",
    "DEFAULT_PRIMITIVES",
    "ETRNLPModule",
    "ETRNLPResNet18",
    "ETRNLPSegNet",
    "ETRNLPTimmResNet",
    "ETRResNet18",
    "ETRSegNet",
    "HardSharingResNet18",
    "HardSharingSegNet",
    "NLPBlock",
    "NLPOptions",
    "NLPResNet18",
    "NLPSegNet",
    "PRIMITIVES",
    "RoutedConv",
    "RoutedNet",
    "RoutedResNet",
    "RoutedSegNet",
    "Routing",
    "SegNetTrunk",
    "SingleTaskResNet18",
    "SingleTaskSegNet",
    "TaskBatchNorm",
    "TaskChannelMask",
    "TaskRouter",
    "TaskRoutingResNet18",
    "TaskRoutingSegNet",
    "build_primitive",
    "route_modules",
]
