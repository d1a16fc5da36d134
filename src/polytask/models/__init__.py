"""Multi-task networks: backbones, heads, and the registered architectures."""

from polytask.models.backbones import PretrainedWeightsError, TimmBackbone, create_timm_model
from polytask.models.base import MODEL_REGISTRY, MultiTaskNet, create_model, register_model
from polytask.models.baselines import HardSharing, SingleTask
from polytask.models.heads import DenseHead, FusionDecoder, ImageHead, make_head

__all__ = [
    "MODEL_REGISTRY",
    "DenseHead",
    "FusionDecoder",
    "HardSharing",
    "ImageHead",
    "MultiTaskNet",
    "PretrainedWeightsError",
    "SingleTask",
    "TimmBackbone",
    "create_model",
    "create_timm_model",
    "make_head",
    "register_model",
]
