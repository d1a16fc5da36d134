"""Training: the Lightning module, schedules and reporting callbacks."""

from polytask.training.module import MultiTaskModule
from polytask.training.report import MetricReport
from polytask.training.schedulers import build_scheduler, lr_factor

__all__ = ["MetricReport", "MultiTaskModule", "build_scheduler", "lr_factor"]
