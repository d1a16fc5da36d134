"""Multi-task networks: backbones, heads, and the registered architectures."""

from polytask.models.backbones import PretrainedWeightsError, TimmBackbone, create_timm_model
from polytask.models.base import MODEL_REGISTRY, MultiTaskNet, create_model, register_model
from polytask.models.baselines import HardSharing, SingleTask
from polytask.models.heads import DenseHead, FusionDecoder, ImageHead, make_head
from polytask.models.taskexpert import StaticTaskExpert, TaskExpert
from polytask.models import etr_nlp  # registers the ETR-NLP networks and baselines

__all__ = [
    "MODEL_REGISTRY",
    "DenseHead",
    "FusionDecoder",
    "HardSharing",
    "ImageHead",
    "MultiTaskNet",
    "PretrainedWeightsError",
    "SingleTask",
    "StaticTaskExpert",
    "TaskExpert",
    "TimmBackbone",
    "create_model",
    "create_timm_model",
    "etr_nlp",
    "make_head",
    "register_model",
]
