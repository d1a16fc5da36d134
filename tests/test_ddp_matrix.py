"""Every model family and training mode of ``configs/`` trains on 2 processes (gloo) and resumes.

Each case is a config of ``configs/`` (with its own callbacks: metric report, checkpoints, expert
usage, learning-rate monitor) shrunk to a tiny network and tiny images, layered with
``configs/trainer/ddp_cpu.yaml``. Two processes (started as torchrun would) run ``polytask fit``
for one epoch (2 batches of 2 images per process, a sanity check, one validation, a checkpoint),
then a second ``polytask fit --ckpt_path <that last.ckpt>`` to the end of the second epoch.
A run that does not end in time (:func:`test_ddp.run_ddp`), such as one hanging in a collective
that only rank 0 enters, fails with the stack of each process.

By default only TaskExpert with its expert-usage monitor runs (the equivalence tests of
``test_ddp.py`` train hard sharing, TaskExpert and ETR-NLP per task on 2 processes); the other
cases are marked ``slow``: ``pytest -m slow tests/test_ddp_matrix.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CONFIGS, TINY_HARD_SHARING_VIT, TINY_RESNET, TINY_SEGNET, TINY_VIT
from test_ddp import DDP_CPU, run_ddp

SYNTH_DATA = {"num_train": 8, "num_val": 4, "image_size": [32, 32], "batch_size": 2, "flip": False}
DIGITS_DATA = {"num_train": 8, "num_val": 4, "scale": 2, "batch_size": 2}
TASKEXPERT = {"num_experts": 3, "width": 16, "head_channels": 8, "mmoe_blocks": [2, 4], "backbone_options": TINY_VIT}
SEGNET = TINY_SEGNET
RESNET = TINY_RESNET
SYNTH_TASKS = 6
"""Tasks of a SynthScenes config without a task list (all of them)."""


@dataclass(frozen=True)
class Case:
    """One config trained on 2 processes.

    Attributes:
        configs: files under ``configs/``, applied in order.
        net: overrides of the network's ``init_args`` (a smaller network).
        data: overrides of the datamodule's ``init_args`` (tiny splits).
        tasks_per_step: optimizer steps per batch (the number of tasks in per-task training).
        extra: further config overrides (``trainer``, ``data`` class...).
        by_steps: the config counts steps (``max_steps``, ``val_check_interval``), not epochs.
        expert_usage: the config writes expert-usage files.
    """

    configs: tuple[str, ...]
    net: dict[str, Any]
    data: dict[str, Any] = field(default_factory=lambda: dict(SYNTH_DATA))
    tasks_per_step: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    by_steps: bool = False
    expert_usage: bool = False


def _taskexpert(**options: Any) -> dict[str, Any]:
    return {**TASKEXPERT, **options}


CASES: dict[str, Case] = {
    "hard_sharing": Case(("hard_sharing_synthscenes.yaml",), {"decoder_channels": 16, "head_channels": 8}),
    "hard_sharing_vit": Case(("hard_sharing_synthscenes_vit.yaml",), TINY_HARD_SHARING_VIT),
    "taskexpert": Case(("taskexpert_synthscenes.yaml",), _taskexpert(), expert_usage=True),
    "taskexpert_paper_config": Case(
        ("taskexpert_pascal_vitb.yaml",),
        _taskexpert(backbone="vit_tiny_patch16_224", pretrained=False, channels_last=False),
        extra={
            "trainer": {"sync_batchnorm": False, "val_check_interval": 2, "max_steps": 2},
            "data": {"class_path": "polytask.data.SynthScenesDataModule"},
        },
        by_steps=True,
        expert_usage=True,
    ),
    "taskexpert_no_memory_read": Case(("taskexpert_synthscenes.yaml",), _taskexpert(memory_read=False), expert_usage=True),
    "taskexpert_memory_gates": Case(
        ("taskexpert_synthscenes.yaml",),
        _taskexpert(gate_input="tokens+memory", memory_write="ema", memory_init="zeros", expert="conv", head="deconv",
                    gate_noise=0.5, balance_weight=0.01),
        expert_usage=True,
    ),
    "taskexpert_static": Case(("taskexpert_static_synthscenes.yaml",), _taskexpert()),
    "taskexpert_image_gates": Case(
        ("taskexpert_synthscenes.yaml",),
        _taskexpert(gate_input="tokens", gate_granularity="image", memory_write="accumulate", expert="mlp2"),
        expert_usage=True,
    ),
    "etr_nlp": Case(("etr_nlp_synthscenes.yaml",), SEGNET),
    "etr_nlp_per_task": Case(("etr_nlp_synthscenes.yaml", "etr_nlp_per_task.yaml"), SEGNET, tasks_per_step=4),
    "etr_nlp_resnet": Case(("etr_nlp_digits.yaml",), RESNET, data=DIGITS_DATA),
    "etr_nlp_resnet_per_task": Case(("etr_nlp_digits.yaml", "etr_nlp_per_task.yaml"), RESNET, data=DIGITS_DATA,
                                    tasks_per_step=4),
    "single_task_segnet": Case(("single_task_synthscenes_etr.yaml",), SEGNET),
    "hard_sharing_segnet": Case(("hard_sharing_synthscenes_etr.yaml",), SEGNET),
    "single_task_resnet": Case(("single_task_digits.yaml",), RESNET, data=DIGITS_DATA),
    "hard_sharing_resnet": Case(("hard_sharing_digits.yaml",), RESNET, data=DIGITS_DATA),
    "etr_nlp_conv_branch_per_task": Case(
        ("etr_nlp_synthscenes.yaml", "etr_nlp_ablation_task_branch_conv.yaml", "etr_nlp_per_task.yaml"), SEGNET,
        tasks_per_step=4,
    ),
    **{
        f"baseline_{kind}_segnet": Case(("etr_nlp_synthscenes.yaml", f"etr_nlp_baseline_{kind}_segnet.yaml"), SEGNET)
        for kind in ("etr", "nlp")
    },
    "baseline_task_routing_segnet": Case(
        ("etr_nlp_synthscenes.yaml", "etr_nlp_baseline_task_routing_segnet_nyuv2.yaml"), SEGNET
    ),
    "baseline_task_routing_resnet_per_task": Case(
        ("etr_nlp_digits.yaml", "etr_nlp_baseline_task_routing_resnet18.yaml", "etr_nlp_per_task.yaml"), RESNET,
        data=DIGITS_DATA, tasks_per_step=4,
    ),
}
DEFAULT_RUN = ("taskexpert",)
"""Cases of the default test run. The equivalence tests of ``test_ddp.py`` also train hard sharing
(the default config), TaskExpert and ETR-NLP per task on 2 processes by default, without the
configs' callbacks and without resuming."""


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _override_config(case: Case) -> dict[str, Any]:
    """The config layered over the case's files: tiny network and data, one epoch or 2 steps."""
    trainer = {"num_sanity_val_steps": 1, "log_every_n_steps": 1, "enable_model_summary": False}
    if not case.by_steps:
        trainer.update(max_epochs=1, max_steps=-1)
    config = {"trainer": trainer, "model": {"init_args": {"net": {"init_args": case.net}}}, "data": {"init_args": case.data}}
    return _merge(config, case.extra)


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SynthScenes cache for every case (``$POLYTASK_CACHE``): each split is rendered once."""
    return tmp_path_factory.mktemp("polytask_cache")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in DEFAULT_RUN else pytest.mark.slow) for n in CASES]
)
def test_config_trains_validates_checkpoints_and_resumes_on_two_processes(name: str, tmp_path: Path, data_cache: Path) -> None:
    case = CASES[name]
    override = tmp_path / "override.yaml"
    override.write_text(json.dumps(_override_config(case)))
    configs = [a for f in case.configs for a in ("--config", str(CONFIGS / f))]
    fit = ["fit", *configs, "--config", str(override), "--config", str(DDP_CPU)]
    resume = ["--trainer.max_steps", "4"] if case.by_steps else ["--trainer.max_epochs", "2"]
    run_ddp([fit, [*fit, *resume, "--ckpt_path", "@last"]], tmp_path, env={"POLYTASK_CACHE": str(data_cache)})

    checkpoints = sorted(tmp_path.glob("runs/**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert len(checkpoints) == 2, f"expected the last.ckpt of each run, found {checkpoints}"
    steps = [torch.load(p, map_location="cpu", weights_only=True)["global_step"] for p in checkpoints]
    assert steps == [2 * case.tasks_per_step, 4 * case.tasks_per_step], "the second run did not resume from the first"
    for checkpoint in checkpoints:
        report = json.loads((checkpoint.parents[1] / "val_metrics.json").read_text())
        assert report["results"], f"no validation metrics next to {checkpoint}"
    usage = sorted(tmp_path.glob("runs/**/expert_usage/step*.json"))
    assert len(usage) == (2 if case.expert_usage else 0), usage
