"""Task-interference diagnostics: gradients per task, cosines and norms, the callback, the CLI flag."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from conftest import HARD_SHARING_CONFIG, TINY_HARD_SHARING_CLI, TINY_SEGNET, TINY_TASKEXPERT, tiny_hard_sharing, tiny_synthscenes
from polytask.cli import main
from polytask.diagnostics import InterferenceStats, TaskInterference, pairwise
from polytask.models import HardSharing, SingleTask, TaskExpert
from polytask.models.etr_nlp import RoutedSegNet
from polytask.tasks import build_task
from polytask.training import MultiTaskModule
from polytask.training.per_task import PerTaskModule
from polytask.weighting import gradient_matrix

TASKS = ("semseg", "depth", "normals")


def dense_tasks() -> list:
    return [build_task("semseg", num_classes=3), build_task("depth"), build_task("normals")]


def test_gradient_matrix_and_pairwise_match_a_hand_computed_case() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    unused = nn.Parameter(torch.zeros(3))
    loss_a = 3 * w[0]  # gradient (3, 0)
    loss_b = -3 * w[0] + 4 * w[1]  # gradient (-3, 4)
    gradients = gradient_matrix([loss_a, loss_b], [w, unused])
    torch.testing.assert_close(gradients, torch.tensor([[3.0, 0, 0, 0, 0], [-3.0, 4, 0, 0, 0]]))
    cos, norms = pairwise(gradients)
    torch.testing.assert_close(norms, torch.tensor([3.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(cos, torch.tensor([[1.0, -0.6], [-0.6, 1.0]], dtype=torch.float64))
    (loss_a + loss_b).backward()  # the graph was kept for the training step's own backward
    torch.testing.assert_close(w.grad, torch.tensor([0.0, 4.0]))


def test_a_zero_gradient_has_cosine_zero_with_the_others() -> None:
    cos, norms = pairwise(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(cos, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert norms.tolist() == [1.0, 0.0]


def test_stats_average_cosines_conflicts_and_norm_ratios() -> None:
    stats = InterferenceStats(2)
    stats.update(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]), torch.tensor([1.0, 2.0]))
    stats.update(torch.tensor([[1.0, 0.25], [0.25, 1.0]]), torch.tensor([3.0, 1.0]))
    means = stats.means()
    torch.testing.assert_close(means["cos"][0, 1], torch.tensor(-0.125, dtype=torch.float64))
    torch.testing.assert_close(means["conflict_fraction"][0, 1], torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(means["norm_ratio"][0, 1], torch.tensor((0.5 + 3.0) / 2, dtype=torch.float64))
    torch.testing.assert_close(means["norm"], torch.tensor([2.0, 1.5], dtype=torch.float64))
    restored = InterferenceStats(2)
    restored.load_state_dict(stats.state_dict())
    assert restored.count == 2 and all(torch.equal(restored.means()[k], v) for k, v in means.items())


def test_shared_parameters_are_the_parts_every_task_reads() -> None:
    tasks = dense_tasks()
    hard = HardSharing(tasks, backbone="test_resnet", decoder_channels=8, head_channels=4)
    assert {id(p) for p in hard.shared_parameters()} == {id(p) for p in (*hard.backbone.parameters(), *hard.decoder.parameters())}

    expert = TaskExpert(tasks, **TINY_TASKEXPERT)
    shared = {id(p) for p in expert.shared_parameters()}
    experts = {id(p) for layer in expert.mmoe for p in layer.experts.parameters()}
    gates = {id(p) for layer in expert.mmoe for p in layer.gates.parameters()}
    assert experts and gates and experts <= shared and not gates & shared
    assert {id(p) for p in expert.backbone.parameters()} <= shared and not {id(p) for p in expert.heads.parameters()} & shared

    routed = RoutedSegNet(tasks, routing="etr_nlp", **TINY_SEGNET)
    groups = routed.param_groups()
    assert [id(p) for p in routed.shared_parameters()] == [id(p) for p in groups["shared"]] and groups["task_specific"]
    assert SingleTask(tasks, backbone="test_resnet", decoder_channels=8, head_channels=4).shared_parameters() == []


def _fit(tmp_path: Path, callbacks: list[pl.Callback], steps: int = 3) -> MultiTaskModule:
    torch.manual_seed(0)
    data = tiny_synthscenes(TASKS, tmp_path / "cache")
    module = MultiTaskModule(net=tiny_hard_sharing(), tasks=data.tasks)
    trainer = pl.Trainer(
        max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module


def test_the_callback_measures_without_changing_training_and_writes_its_summary(tmp_path: Path) -> None:
    plain = _fit(tmp_path / "plain", [])
    monitor = TaskInterference(every_n_steps=2, out_dir=str(tmp_path / "interference"))
    watched = _fit(tmp_path / "watched", [monitor])
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the extra backward passes leave .grad alone
    assert monitor.stats is not None and monitor.stats.count == 2  # steps 0 and 2 of 3
    summary = json.loads((tmp_path / "interference" / "summary.json").read_text())
    assert summary["tasks"] == list(TASKS) and summary["measurements"] == 2
    cos = torch.tensor(summary["cos"], dtype=torch.float64)
    assert cos.shape == (3, 3) and torch.equal(cos, cos.T) and torch.allclose(cos.diagonal(), torch.ones(3, dtype=torch.float64))
    assert (cos.abs() <= 1).all() and (tmp_path / "interference" / "heatmap.png").stat().st_size > 1000
    assert "| semseg | depth |" in (tmp_path / "interference" / "summary.md").read_text()
    assert monitor.state_dict()["stats"]["count"] == 2


def test_the_callback_refuses_what_it_cannot_measure(tmp_path: Path) -> None:
    data = tiny_synthscenes(TASKS, tmp_path / "cache")
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=[TaskInterference(1)])
    single = MultiTaskModule(net=lambda tasks: SingleTask(tasks, backbone="test_resnet", decoder_channels=8, head_channels=4), tasks=data.tasks)
    with pytest.raises(ValueError, match="no parameters shared by its tasks"):
        trainer.fit(single, datamodule=data)
    per_task = PerTaskModule(net=lambda tasks: RoutedSegNet(tasks, routing="etr_nlp", **TINY_SEGNET), tasks=data.tasks)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=[TaskInterference(1)])
    with pytest.raises(ValueError, match="per-task optimisation"):
        trainer.fit(per_task, datamodule=data)
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        TaskInterference(0)


@pytest.mark.usefixtures("one_thread")
def test_fit_flag_logs_every_measurement_and_writes_the_heatmap_in_the_run_folder(workdir: Path) -> None:
    main([
        "fit", "--config", HARD_SHARING_CONFIG, *TINY_HARD_SHARING_CLI, "--interference", "1",
        "--data.init_args.tasks", "[semseg, depth]", "--data.init_args.num_train", "16", "--data.init_args.num_val", "4",
        "--data.init_args.image_size", "[32, 32]", "--trainer.max_steps", "3", "--trainer.num_sanity_val_steps", "0",
    ])  # fmt: skip
    (run,) = workdir.glob("runs/*/version_0")
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("interference/cos/semseg/depth")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(-1 <= float(r["interference/cos/semseg/depth"]) <= 1 and float(r["interference/norm_ratio/semseg/depth"]) > 0 for r in rows)
    assert json.loads((run / "interference" / "summary.json").read_text())["measurements"] == 3
    assert (run / "interference" / "heatmap.png").is_file()
