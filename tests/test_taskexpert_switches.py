"""TaskExpert: every switch combination either builds and trains every parameter, or refuses to build.

``untrainable_reasons`` decides from the switches alone; these tests check it in both directions: a
combination that builds gives every parameter a nonzero gradient, and a combination it refuses does
leave some parameter without one when built anyway.
"""

import itertools

import pytest
import torch

from polytask.models import taskexpert
from polytask.models.taskexpert import TaskExpert, untrainable_reasons
from polytask.tasks import build_task

IMAGE = (32, 48)
BACKBONE = {"img_size": IMAGE, "embed_dim": 32, "depth": 4, "num_heads": 2}

# gating and memory slot: the full model, the no-memory ablation, the static control
MODES = [
    {"memory_read": True},
    {"memory_read": False},
    {"gating": "static", "memory_read": False},
]
WRITES = [
    {"memory_write": "replace"},
    {"memory_write": "accumulate"},
    {"memory_write": "ema", "memory_momentum": 0.5},
    {"memory_write": "ema", "memory_momentum": 0.0},
    {"memory_write": "ema", "memory_momentum": 1.0},
]
GATES = [
    {"gate_input": gate_input, **granularity}
    for gate_input in ("tokens", "tokens+context", "tokens+memory")
    for granularity in ({"gate_granularity": "token"},
                        {"gate_granularity": "image", "gate_temperature": 0.5, "gate_noise": 0.1})
]
GATING_SHAPES = list(itertools.product(MODES, ("none", "zeros"), (1, 2), ([2, 4], [4])))
"""Whether a layer has a gate, a memory slot and a memory gate input: gating, memory_init, N, layers."""
ALL_MEMORY_SWITCHES = [
    {**mode, **write, "memory_init": init, "num_experts": experts, "mmoe_blocks": blocks, **gate}
    for (mode, init, experts, blocks), write in itertools.product(GATING_SHAPES, WRITES)
    for gate in (GATES if mode.get("gating") != "static" else [{}])
]
"""The full product of the switches that decide where gradients flow (slow run)."""
MEMORY_SWITCHES = [
    options for options in ALL_MEMORY_SWITCHES
    if options.get("gate_input", "tokens+context") == "tokens+context" and options.get("gate_granularity") != "image"
    or options["memory_write"] == "replace"
]
"""Default run: every gate setting with every gating shape (replace write), every write with every gating
shape (default gate). The gate settings touch only the gate's own parameters, whose gradient depends on
the gating shape, which both halves cross; the slow test runs the full product."""
STRUCTURE_SWITCHES = [
    {**mode, "expert": expert, **head, **blocks}
    for mode, expert, head, blocks in itertools.product(
        MODES,
        ("mlp", "mlp2", "conv"),
        ({"head": "project", "head_scale": 4}, {"head": "bilinear", "head_scale": 1},
         {"head": "deconv", "channels_last": False}),
        ({"mmoe_blocks": [1, 2, 3, 4]}, {"mmoe_blocks": [2, 3], "final_norm_on_last": False}),
    )
]


def tasks() -> list:
    """A dense task of each head kind and an image-level one."""
    return [build_task("semseg", num_classes=5), build_task("normals"),
            build_task("attributes", name="mouth", attribute_names=["a", "b"])]


def build(options: dict) -> TaskExpert:
    """A tiny TaskExpert (ViT of depth 4, width 32, on 32x48 images) with ``options``."""
    torch.manual_seed(0)
    defaults = {"num_experts": 3, "width": 16, "head_channels": 8}
    return TaskExpert(tasks(), backbone="vit_tiny_patch16_224", backbone_options=dict(BACKBONE),
                      **{**defaults, **options})


def parameters_without_gradient(net: TaskExpert) -> list[str]:
    """Names of the parameters whose gradient is missing or zero after one training forward and backward."""
    net.train()
    g = torch.Generator().manual_seed(2)
    out = net(torch.randn(2, 3, *IMAGE, generator=torch.Generator().manual_seed(1)))
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in out.values()).backward()
    return [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def switch_id(options: dict) -> str:
    """Test id: the switches as ``key=value`` pairs."""
    return ",".join(f"{k}={v}" for k, v in options.items())


def reasons_of(options: dict) -> list[str]:
    """:func:`untrainable_reasons` for ``options`` on top of :func:`build`'s defaults."""
    full = {"num_experts": 3, "gating": "dynamic", "memory_read": True, "memory_write": "replace",
            "memory_momentum": 0.5, "memory_init": "none", **options}
    return untrainable_reasons(full["mmoe_blocks"], full["num_experts"], full["gating"], full["memory_read"],
                               full["memory_write"], full["memory_momentum"], full["memory_init"])


def check_builds_and_trains_or_refuses(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """``options`` either build a network whose every parameter gets a nonzero gradient, or are refused
    with a message naming the switches, and the refusal is necessary (built anyway, some parameter gets
    no gradient)."""
    if options.get("gate_input") == "tokens+memory" and not options["memory_read"]:
        with pytest.raises(ValueError, match="gate_input 'tokens\\+memory' needs memory_read: true"):
            build(options)
        return
    reasons = reasons_of(options)
    if not reasons:
        assert parameters_without_gradient(build(options)) == []
        return
    with pytest.raises(ValueError, match="refuses to build") as refusal:
        build(options)
    message = str(refusal.value)
    assert all(reason in message for reason in reasons)
    assert all(reason.startswith(("num_experts: 1 with memory_", "memory_write: ema with memory_momentum: 1.0"))
               for reason in reasons)  # each reason names the switches that cause it
    monkeypatch.setattr(taskexpert, "untrainable_reasons", lambda *args: [])
    assert parameters_without_gradient(build(options)) != []


@pytest.mark.parametrize("options", MEMORY_SWITCHES + STRUCTURE_SWITCHES, ids=switch_id)
def test_every_switch_combination_builds_and_trains_every_parameter_or_refuses(
    options: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_builds_and_trains_or_refuses(options, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("options", [o for o in ALL_MEMORY_SWITCHES if o not in MEMORY_SWITCHES], ids=switch_id)
def test_full_product_of_memory_and_gate_switches(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    check_builds_and_trains_or_refuses(options, monkeypatch)


def test_the_refusals_name_the_blocks_and_the_fix() -> None:
    one_slot = reasons_of({"mmoe_blocks": [3, 6, 9], "num_experts": 1, "memory_read": False})
    assert one_slot == [
        "num_experts: 1 with memory_read: false gives the gate of the MMoE layer(s) after block(s) [3, 6, 9] a "
        "single slot: a softmax over one logit is the constant 1, so those gates never receive a gradient; use "
        "num_experts >= 2, gating: static, or memory_read: true with memory_init: zeros"
    ]
    first_only = reasons_of({"mmoe_blocks": [3, 6, 9], "num_experts": 1})
    assert len(first_only) == 1 and "block(s) [3] a single slot" in first_only[0]
    assert reasons_of({"mmoe_blocks": [3, 6, 9], "num_experts": 1, "memory_init": "zeros"}) == []
    assert reasons_of({"mmoe_blocks": [3, 6, 9], "num_experts": 1, "gating": "static", "memory_read": False}) == []
    frozen = reasons_of({"mmoe_blocks": [3, 6, 9], "memory_write": "ema", "memory_momentum": 1.0})
    assert len(frozen) == 1 and "block(s) [6, 9] never reach the heads" in frozen[0]


def test_inconsistent_static_and_momentum_options_are_refused() -> None:
    with pytest.raises(ValueError, match="gating: static has no gate slot"):
        build({"gating": "static"})
    with pytest.raises(ValueError, match="gating: static has no gates to balance"):
        build({"gating": "static", "memory_read": False, "balance_weight": 0.1})
    with pytest.raises(ValueError, match="memory_momentum must be in"):
        build({"memory_write": "ema", "memory_momentum": 1.5})
    with pytest.raises(ValueError, match="unknown gating"):
        build({"gating": "fixed"})
