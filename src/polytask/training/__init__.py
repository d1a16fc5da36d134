"""Training: the Lightning module, schedules, checkpointing and reporting callbacks."""

from polytask.training.checkpoint import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    ResumableCheckpoint,
    UnsafeCheckpointError,
    export_safetensors,
    load_weights,
)
from polytask.training.guard import NonFiniteGuard, NonFiniteTrainingError
from polytask.training.module import MultiTaskModule
from polytask.training.per_task import GradientMismatchError, PerTaskModule, all_reduce_gradients
from polytask.training.prediction_writer import PredictionWriter
from polytask.training.report import MetricReport
from polytask.training.schedulers import build_scheduler, lr_factor
from polytask.training.validation_images import ValidationImages

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointMismatchError",
    "GradientMismatchError",
    "MetricReport",
    "MultiTaskModule",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "PerTaskModule",
    "PredictionWriter",
    "ResumableCheckpoint",
    "UnsafeCheckpointError",
    "ValidationImages",
    "all_reduce_gradients",
    "build_scheduler",
    "export_safetensors",
    "load_weights",
    "lr_factor",
]
