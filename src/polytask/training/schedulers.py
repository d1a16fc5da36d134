"""Per-iteration learning-rate schedules."""

from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

ScheduleName = Literal["poly", "cosine", "constant"]


def lr_factor(step: int, total_steps: int, schedule: ScheduleName, power: float = 0.9, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    ``poly``: ``(1 - step / total) ** power`` (InvPT/TaskExpert recipe); ``cosine``: half a cosine
    from 1 to 0; ``constant``: 1. A linear warm-up over ``warmup_steps`` multiplies any of them.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(step, total_steps) / total_steps
    if schedule == "poly":
        factor = (1.0 - progress) ** power
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "constant":
        factor = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose poly, cosine or constant")
    if warmup_steps > 0 and step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    return factor


def build_scheduler(optimizer: Optimizer, total_steps: int, schedule: ScheduleName, power: float = 0.9, warmup_steps: int = 0) -> LambdaLR:
    """A ``LambdaLR`` stepping :func:`lr_factor` once per optimizer step."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, schedule, power, warmup_steps))
