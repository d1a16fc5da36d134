"""Learning-rate schedules."""

import math

import pytest
import torch

from polytask.training.schedulers import build_scheduler, lr_factor


def test_poly_schedule_values() -> None:
    assert lr_factor(0, 100, "poly") == 1.0
    assert math.isclose(lr_factor(50, 100, "poly", power=0.9), 0.5**0.9)
    assert lr_factor(100, 100, "poly") == 0.0


def test_cosine_and_warmup() -> None:
    assert math.isclose(lr_factor(50, 100, "cosine"), 0.5, abs_tol=1e-12)
    assert math.isclose(lr_factor(0, 100, "constant", warmup_steps=4), 0.25)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, 10, "linear")  # type: ignore[arg-type]


def test_scheduler_steps_per_iteration() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = build_scheduler(opt, 10, "poly", power=1.0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 1.0)
