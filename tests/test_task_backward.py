"""Back-propagating task by task in a training step whose network runs its task paths apart.

ETR-NLP (and the routed baselines) looping over their task paths give the same gradients whether
the total is back-propagated once or each task's loss right after its path's forward; the second
holds one path's activations at a time. These tests compare the two ways in float64: the gradients
of one step to rounding, and six steps of training to 1e-5 (the task losses are computed in
float32: a parameter difference of 1e-16 can flip one of their roundings, and such flips grew the
differences to about 1e-6 in six steps of SGD at learning rate 1e-3, measured).
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import TINY_SEGNET, tiny_synthscenes
from polytask.diagnostics import TaskInterference
from polytask.models.etr_nlp import RoutedSegNet
from polytask.training.module import MultiTaskModule
from polytask.weighting import FAMO, DynamicWeightAverage, UncertaintyWeighting, Weighting

TASKS = ("semseg", "depth", "normals")


def routed(task_batching: str = "loop") -> functools.partial:
    return functools.partial(RoutedSegNet, routing="etr_nlp", task_batching=task_batching, **TINY_SEGNET)


def train(
    root: Path, task_backward: str, weighting: Weighting | None = None, task_batching: str = "loop", **trainer_options: object
) -> tuple[MultiTaskModule, pl.Trainer, list[bool]]:
    """Fit 3 epochs of 2 steps in float64 with plain SGD at a small learning rate (Adam, or a larger
    rate, magnifies rounding-level differences); also returns, per step, whether it went task by task."""
    pl.seed_everything(0)
    data = tiny_synthscenes(TASKS, root / "cache")
    module = MultiTaskModule(
        net=routed(task_batching), tasks=data.tasks, default_loss_weights=data.loss_weights, weighting=weighting,
        task_backward=task_backward, optimizer=functools.partial(torch.optim.SGD, lr=1e-3),
    )  # fmt: skip
    by_task: list[bool] = []
    decide = module.backward_by_task
    module.backward_by_task = lambda images: by_task.append(decide(images)) or by_task[-1]  # type: ignore[method-assign]
    trainer = pl.Trainer(
        default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
        precision="64-true", max_epochs=3, **trainer_options,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, trainer, by_task


@pytest.mark.parametrize("weighting", [None, UncertaintyWeighting], ids=["fixed", "uncertainty"])
def test_one_step_gives_the_joint_backwards_gradients(weighting: type | None, tmp_path: Path) -> None:
    data = tiny_synthscenes(TASKS, tmp_path / "cache")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(0)
    module = MultiTaskModule(
        net=routed(), tasks=data.tasks, default_loss_weights=data.loss_weights, weighting=weighting and weighting()
    ).double()
    batch["image"] = batch["image"].double()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    gradients = []
    for mode in ("joint", "auto"):
        module.load_state_dict(state)
        module.zero_grad(set_to_none=True)
        module.task_backward = mode
        assert module.backward_by_task(batch["image"]) == (mode == "auto")
        module.backward(module.training_step(batch, 0))
        gradients.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == len(list(module.parameters()))
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=1e-12, atol=1e-15, msg=name)
    assert not module._gradients_ready  # the skipped backward reset the flag


@pytest.mark.parametrize("weighting", [None, UncertaintyWeighting, DynamicWeightAverage], ids=["fixed", "uncertainty", "dwa"])
def test_task_by_task_backward_trains_like_the_joint_backward(weighting: type | None, tmp_path: Path) -> None:
    joint, joint_trainer, joint_used = train(tmp_path / "joint", "joint", weighting and weighting())
    by_task, by_task_trainer, by_task_used = train(tmp_path / "by_task", "auto", weighting and weighting())
    assert joint_used == [False] * 6 and by_task_used == [True] * 6
    initial = RoutedSegNet(joint.tasks, routing="etr_nlp", **TINY_SEGNET).state_dict()
    moved = 0
    for key, value in joint.state_dict().items():
        torch.testing.assert_close(by_task.state_dict()[key], value, rtol=1e-5, atol=1e-5, msg=key)
        net_key = key.removeprefix("net.")
        moved += key.startswith("net.") and value.is_floating_point() and not torch.equal(value, initial[net_key].to(value))
    assert moved > 10  # training moved the weights: the comparison is not of two untouched networks
    for name in ("train/loss", *(f"train/loss/{t}" for t in TASKS), *(f"train/weight/{t}" for t in TASKS)):
        torch.testing.assert_close(
            torch.as_tensor(by_task_trainer.logged_metrics[name]).double(),
            torch.as_tensor(joint_trainer.logged_metrics[name]).double(), rtol=1e-5, atol=1e-5, msg=name,
        )  # fmt: skip


def test_joint_backward_where_task_by_task_cannot_serve(tmp_path: Path) -> None:
    """Stacked task paths, FAMO (needs every loss of the step), the interference callback (reads the
    losses' graphs before the backward) and gradient accumulation keep the joint backward."""
    assert train(tmp_path / "stacked", "auto", task_batching="stacked")[2] == [False] * 6
    assert train(tmp_path / "famo", "auto", FAMO())[2] == [False] * 6
    callback = TaskInterference(every_n_steps=2, out_dir=str(tmp_path / "interference"))
    assert train(tmp_path / "interference", "auto", callbacks=[callback])[2] == [False] * 6
    assert train(tmp_path / "accumulate", "auto", accumulate_grad_batches=2)[2] == [False] * 6


def test_task_backward_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="task_backward must be 'auto' or 'joint'"):
        MultiTaskModule(net=routed(), tasks=[], task_backward="sometimes")  # type: ignore[arg-type]
