"""The static-decoding control of TaskExpert: registered, gate-free, same experts and heads, matched cost."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from polytask.cli.summary import main as summary_main
from polytask.models import MODEL_REGISTRY, create_model
from polytask.models.summary import summarize_model
from polytask.models.taskexpert import MMoELayer, StaticTaskExpert, TaskExpert
from polytask.tasks import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGE = (32, 48)
BACKBONE = {"img_size": IMAGE, "embed_dim": 32, "depth": 4, "num_heads": 2}
PAPER_TASKS = {
    "pascal": lambda: [
        build_task("semseg", num_classes=21),
        build_task("human_parts", num_classes=7),
        build_task("sal"),
        build_task("normals"),
        build_task("edge"),
    ],
    "nyud": lambda: [build_task("semseg", num_classes=40), build_task("depth"), build_task("normals"), build_task("edge")],
}


def tasks() -> list:
    return [build_task("semseg", num_classes=5), build_task("normals"), build_task("attributes", name="mouth", attribute_names=["a", "b"])]


def tiny(cls: type[TaskExpert], **options: object) -> TaskExpert:
    torch.manual_seed(0)
    return cls(
        tasks(), backbone="vit_tiny_patch16_224", backbone_options=dict(BACKBONE), num_experts=3, width=16, head_channels=8, **options
    )


def test_static_control_is_registered_and_has_no_gates() -> None:
    assert MODEL_REGISTRY["taskexpert_static"] is StaticTaskExpert
    net = create_model(
        "taskexpert_static", tasks(), backbone="vit_tiny_patch16_224", backbone_options=dict(BACKBONE), num_experts=3, width=16
    )
    assert isinstance(net, StaticTaskExpert)
    assert all(layer.gates is None and not layer.reads_memory for layer in net.mmoe)
    assert not any(".gates." in name for name, _ in net.named_parameters())


def test_static_control_has_the_experts_and_heads_of_taskexpert_and_nothing_else() -> None:
    dynamic, static = tiny(TaskExpert).state_dict(), tiny(StaticTaskExpert).state_dict()
    assert {k: v.shape for k, v in static.items()} == {k: v.shape for k, v in dynamic.items() if ".gates." not in k}


def test_static_layer_averages_the_experts_and_adds_the_memory_for_every_task() -> None:
    torch.manual_seed(0)
    layer = MMoELayer(24, 16, num_tasks=3, num_experts=4, reads_memory=False, gating="static")
    tokens, memory = torch.randn(2, 6, 24), torch.randn(2, 6, 3, 16)
    experts = layer.experts(tokens, (2, 3))
    first, gates = layer(tokens, None, (2, 3))
    torch.testing.assert_close(gates, torch.full((2, 1, 3, 4), 0.25))
    torch.testing.assert_close(first, experts.mean(dim=2, keepdim=True).expand(-1, -1, 3, -1))
    torch.testing.assert_close(layer(tokens, memory, (2, 3))[0], first + memory)


def test_static_control_gives_every_task_the_same_features() -> None:
    net = tiny(StaticTaskExpert).eval()
    memory, gates = net.task_features(torch.randn(2, 3, *IMAGE))
    for t in range(1, 3):
        torch.testing.assert_close(memory[:, :, t], memory[:, :, 0])
    assert net.gate_slot_names() == [["e0", "e1", "e2"]] * 4


def decoder_params(groups: dict[str, int]) -> int:
    """Parameters outside the backbone (MMoE layers and heads)."""
    return groups["mmoe"] + groups["heads"]


def within(a: float, b: float, tolerance: float = 0.10) -> bool:
    """``a`` within ``tolerance`` (relative) of ``b``."""
    return abs(a - b) <= tolerance * b


def test_synthscenes_static_config_matches_taskexpert_params_and_flops(tmp_path: Path) -> None:
    """``polytask summary`` of the two SynthScenes configs: totals and MMoE + heads within 10 %."""
    data = ["--data.init_args.num_train=2", "--data.init_args.num_val=2", f"--data.init_args.cache_dir={tmp_path}"]
    summaries = {}
    for name in ("taskexpert_synthscenes", "taskexpert_static_synthscenes"):
        out = tmp_path / f"{name}.json"
        assert summary_main(["--config", str(CONFIGS / f"{name}.yaml"), "--json", str(out), *data]) == 0
        summaries[name] = json.loads(out.read_text())
    dynamic, static = summaries["taskexpert_synthscenes"], summaries["taskexpert_static_synthscenes"]
    assert static["net"] == "StaticTaskExpert" and static["image_size"] == dynamic["image_size"]
    assert static["groups"]["heads"] == dynamic["groups"]["heads"]
    assert within(static["total_params"], dynamic["total_params"])
    assert within(decoder_params(static["groups"]), decoder_params(dynamic["groups"]))
    assert within(static["flops"], dynamic["flops"])


@pytest.mark.parametrize("config", ["pascal_vitl", "nyud_vitb"])
def test_paper_configs_static_control_matches_params_and_flops(config: str) -> None:
    """The paper configs with ``gating: static`` (built on the meta device: shapes only, exact counts)."""
    init = yaml.safe_load((CONFIGS / f"taskexpert_{config}.yaml").read_text())["model"]["net"]["init_args"]
    init = {**init, "pretrained": False}
    with torch.device("meta"):
        dynamic = TaskExpert(PAPER_TASKS[config.split("_")[0]](), **init)
        static = TaskExpert(PAPER_TASKS[config.split("_")[0]](), **{**init, "memory_read": False, "gating": "static"})
    a, b = summarize_model(static, static.image_size), summarize_model(dynamic, dynamic.image_size)
    assert a.groups["heads"] == b.groups["heads"] and a.groups["backbone"] == b.groups["backbone"]
    assert within(a.total_params, b.total_params)
    assert within(decoder_params(a.groups), decoder_params(b.groups))
    assert within(a.flops, b.flops)


def test_expert_usage_diagnostics_leave_the_static_control_alone() -> None:
    """Its gates are the constant 1/N: no usage files, tables or dominant-expert maps for it."""
    from polytask.diagnostics.expert_usage import gate_recorder_of

    static, dynamic = tiny(StaticTaskExpert), tiny(TaskExpert)
    assert not static.learned_gates and dynamic.learned_gates
    assert gate_recorder_of(static) is None and gate_recorder_of(dynamic) is dynamic
