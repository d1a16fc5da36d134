"""ETR-NLP (Ding et al., CVPR 2023): explicit task routing with non-learnable primitives, and its baselines.

One class per architecture, the routing a constructor argument: :class:`RoutedSegNet` and
:class:`RoutedResNet` take ``routing`` (:data:`RoutingKind`: ``etr_nlp``, ``etr``, ``nlp``,
``task_routing``, ``hard_sharing``, ``single_task``). Importing this package registers each as
``<routing>_segnet`` and ``<routing>_resnet18`` (``etr_nlp_segnet``, ``hard_sharing_resnet18``, ...),
and ``etr_nlp_timm_resnet``, in :data:`polytask.models.MODEL_REGISTRY`.
"""

from polytask.models.etr_nlp.conversion import Routing, RoutingKind, route_modules
from polytask.models.etr_nlp.layers import BlockBatchNorm, ETRNLPModule, RoutedConv, TaskBatchNorm, TaskChannelMask
from polytask.models.etr_nlp.net import (
    LOOP_ABOVE_ELEMENTS,
    RoutedNet,
    TaskBatching,
    choose_task_batching,
    register_routing_variants,
    stacked_first_layer_elements,
)
from polytask.models.etr_nlp.nlp import NLPBlock, NLPOptions
from polytask.models.etr_nlp.primitives import DEFAULT_PRIMITIVES, PRIMITIVES, build_primitive
from polytask.models.etr_nlp.resnet import ETRNLPTimmResNet, RoutedResNet
from polytask.models.etr_nlp.segnet import RoutedSegNet, SegNetTrunk
from polytask.models.etr_nlp.stacked_batch import TaskRouter

__all__ = [
    "DEFAULT_PRIMITIVES",
    "LOOP_ABOVE_ELEMENTS",
    "PRIMITIVES",
    "BlockBatchNorm",
    "ETRNLPModule",
    "ETRNLPTimmResNet",
    "NLPBlock",
    "NLPOptions",
    "RoutedConv",
    "RoutedNet",
    "RoutedResNet",
    "RoutedSegNet",
    "Routing",
    "RoutingKind",
    "SegNetTrunk",
    "TaskBatchNorm",
    "TaskBatching",
    "TaskChannelMask",
    "TaskRouter",
    "build_primitive",
    "choose_task_batching",
    "register_routing_variants",
    "route_modules",
    "stacked_first_layer_elements",
]
