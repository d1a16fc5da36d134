"""ETR-NLP: frozen primitives, the routed layers, the forward modes, checkpoints and per-task training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import get_args
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch

from polytask.config import instantiate
from polytask.data.datasets.digits import DigitsDataModule
from polytask.models import MODEL_REGISTRY, create_model
from polytask.models.etr_nlp import (
    PRIMITIVES,
    ETRNLPModule,
    NLPBlock,
    NLPOptions,
    RoutedConv,
    RoutedNet,
    RoutedResNet,
    RoutedSegNet,
    Routing,
    RoutingKind,
    TaskBatchNorm,
    TaskRouter,
    choose_task_batching,
)
from polytask.models.etr_nlp.segnet import max_unpool
from polytask.tasks import build_task
from polytask.training.per_task import PerTaskModule

REPO = Path(__file__).resolve().parents[1]
ALL_PRIMITIVES = NLPOptions(primitives=tuple(PRIMITIVES), pointwise_primitives=("perturbation", "identity"))
TINY_SEGNET = {"filters": (8, 8, 16, 16, 16)}
TINY_RESNET = {"backbone_options": {"channels": (8, 8, 16, 16), "stem_width": 8}}


def dense_tasks() -> list:
    return [build_task("semseg", num_classes=3), build_task("depth"), build_task("normals")]


def attribute_tasks(n: int = 4) -> list:
    return [build_task("attributes", name=f"group{i}", attribute_names=["a", "b"]) for i in range(n)]


def tiny_segnet(seed: int = 0, **options: object) -> RoutedSegNet:
    torch.manual_seed(0)
    return RoutedSegNet(dense_tasks(), routing="etr_nlp", nlp=ALL_PRIMITIVES, seed=seed, **TINY_SEGNET, **options)


def primitive_buffers(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b for name, b in net.named_buffers() if ".primitives." in name}


def test_primitives_are_buffers_without_gradient_and_survive_an_optimizer_step() -> None:
    net = tiny_segnet().train()
    buffers = primitive_buffers(net)
    kinds = {name.rsplit(".", 1)[-1] for name in buffers}
    assert kinds == {"weight", "seed"}  # frozen convolutions and the perturbation seeds
    assert not any(".primitives." in name for name, _ in net.named_parameters())
    before = {name: b.clone() for name, b in buffers.items()}
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    out = net(torch.randn(2, 3, 32, 32))
    sum(o.square().mean() for o in out.values()).backward()
    optimizer.step()
    for name, b in primitive_buffers(net).items():
        assert not b.requires_grad and b.grad is None
        assert torch.equal(b, before[name]), name
    mix = net.trunk.encoder_block[1][0].shared.mix.weight
    assert mix.grad is not None and mix.grad.abs().sum() > 0


def test_local_binary_and_random_primitives_follow_their_definitions() -> None:
    block = NLPBlock(6, 6, ("local_binary", "random_conv", "dilated_random_conv"), sparsity=0.5, seed=3)
    binary, random_conv, dilated = block.primitives
    assert set(binary.weight.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (binary.weight != 0).flatten(1).sum(1).eq(5).all()  # floor(0.5 * 9 + 0.5) non-zero per channel
    assert random_conv.weight.shape == (6, 1, 3, 3) and dilated.dilation == 2
    again = NLPBlock(6, 6, ("local_binary", "random_conv", "dilated_random_conv"), sparsity=0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(block.buffers(), again.buffers()))


def test_perturbation_mask_is_a_fixed_function_of_seed_and_size() -> None:
    block = NLPBlock(2, 2, ("perturbation",), noise_level=0.1, seed=5)
    perturb = block.primitives[0]
    x = torch.zeros(1, 2, 5, 7)
    first = perturb(x)
    assert first.abs().max() <= 0.1 and first.abs().max() > 0
    assert torch.equal(first, NLPBlock(2, 2, ("perturbation",), noise_level=0.1, seed=5).primitives[0](x))
    assert perturb(torch.zeros(1, 2, 6, 7)).shape == (1, 2, 6, 7)


def test_channel_shuffle_puts_the_responses_of_each_input_channel_in_one_group() -> None:
    block = NLPBlock(4, 4, ("identity", "identity"), groups=4)
    assert block.mix.weight.shape == (4, 2, 1, 1)
    x = torch.randn(2, 4, 3, 3)
    expected = x * block.mix.weight.sum(dim=(1, 2, 3)).view(1, 4, 1, 1)
    torch.testing.assert_close(block(x), expected)
    assert NLPBlock(6, 9).mix.groups == 3  # default gcd(C_in, C_shared)
    assert NLPBlock(6, 9, groups=1).mix.groups == 1


@pytest.mark.parametrize(("gamma", "shared"), [(0.0, 0), (0.25, 5), (0.9, 18), (1.0, 20)])
def test_shared_and_task_channels_follow_gamma(gamma: float, shared: int) -> None:
    router = TaskRouter(3)
    conv = RoutedConv(router, 8, 20, gamma=gamma)
    assert (conv.shared_channels, conv.task_channels) == (shared, 20 - shared)
    assert (conv.shared is None) == (shared == 0)
    if shared < 20:
        assert conv.task_convs is not None and len(conv.task_convs) == 3
        assert all(c.out_channels == 20 - shared for c in conv.task_convs)
    with router.route([1]):
        assert conv(torch.randn(2, 8, 6, 6)).shape == (2, 20, 6, 6)


def test_every_routed_convolution_of_a_network_uses_gamma() -> None:
    net = RoutedResNet(attribute_tasks(), routing="etr_nlp", gamma=0.75, **TINY_RESNET)
    plain = create_model("hard_sharing_resnet18", attribute_tasks(), **TINY_RESNET)
    convs = [m for m in net.trunk.modules() if isinstance(m, RoutedConv)]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in plain.trunk.modules()) >= 20
    assert all(c.shared_channels == round(0.75 * c.out_channels) for c in convs)


def test_stride_applies_after_the_primitives_and_matches_the_task_branch() -> None:
    router = TaskRouter(2)
    module = ETRNLPModule(router, 3, 10, stride=2, nlp=ALL_PRIMITIVES)
    with router.route([0, 1]):
        y = module(torch.randn(2 * 2, 3, 9, 12))
    assert y.shape == (4, 10, 5, 6)
    assert (y >= 0).all()


def test_task_branches_get_gradient_only_from_their_own_task_in_per_task_mode() -> None:
    net = tiny_segnet().train()
    net.forward_task(torch.randn(2, 3, 32, 32), "depth").square().mean().backward()
    own = net.task_index["depth"]
    routed = [m for m in net.modules() if isinstance(m, RoutedConv)]
    norms = [m for m in net.modules() if isinstance(m, TaskBatchNorm)]
    assert routed and norms
    for conv in routed:
        assert conv.task_convs is not None
        for t, task_conv in enumerate(conv.task_convs):
            assert (task_conv.weight.grad is not None) == (t == own)
        assert conv.shared is not None and conv.shared.mix.weight.grad is not None
    assert norms[0].weight is not None
    assert [w.grad is not None for w in norms[0].weight] == [t == own for t in range(3)]
    assert all(p.grad is None for name in ("semseg", "normals") for p in net.heads[name].parameters())


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("etr_nlp_segnet", {"nlp": ALL_PRIMITIVES, "task_branch": "nlp", **TINY_SEGNET}),
        ("etr_nlp_segnet", {"nlp": ALL_PRIMITIVES, "task_branch": "conv", "running_stats": False, **TINY_SEGNET}),
        ("etr_segnet", TINY_SEGNET),
        ("task_routing_segnet", TINY_SEGNET),
        ("task_routing_segnet", {"running_stats": False, **TINY_SEGNET}),
        ("single_task_segnet", TINY_SEGNET),
        ("etr_nlp_resnet18", {"task_branch": "nlp", **TINY_RESNET}),
        ("etr_nlp_resnet18", {"task_branch": "conv", **TINY_RESNET}),
        ("task_routing_resnet18", TINY_RESNET),
        ("etr_nlp_timm_resnet", {"decoder_channels": 8, "head_channels": 4, **TINY_RESNET}),
    ],
)
def test_batched_mode_is_bit_equal_to_per_task_mode_in_float64(name: str, options: dict, train: bool) -> None:
    tasks = attribute_tasks() if "resnet18" in name else dense_tasks()
    torch.manual_seed(0)
    net = create_model(name, tasks, **options).double().train(train)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    batched = net(images)
    for task in tasks:
        torch.testing.assert_close(batched[task.name], net.forward_task(images, task.name), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["etr_nlp_segnet", "task_routing_segnet", "etr_nlp_timm_resnet"])
def test_looped_and_stacked_task_paths_give_equal_outputs_gradients_and_statistics_in_float64(name: str) -> None:
    options = {"decoder_channels": 8, "head_channels": 4, **TINY_RESNET} if name == "etr_nlp_timm_resnet" else TINY_SEGNET
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    runs = {}
    for mode in ("stacked", "loop"):
        torch.manual_seed(0)
        net = create_model(name, dense_tasks(), task_batching=mode, **options).double().train()
        outputs = net(images)
        sum(out.pow(2).mean() for out in outputs.values()).backward()
        runs[mode] = (outputs, {n: p.grad for n, p in net.named_parameters() if p.grad is not None}, dict(net.named_buffers()))
    (out_s, grad_s, buf_s), (out_l, grad_l, buf_l) = runs["stacked"], runs["loop"]
    assert out_s.keys() == out_l.keys() and grad_s.keys() == grad_l.keys() and len(grad_s) > 0
    for key in out_s:
        torch.testing.assert_close(out_s[key], out_l[key], rtol=0, atol=0)
    for key in grad_s:
        torch.testing.assert_close(grad_s[key], grad_l[key], rtol=1e-12, atol=1e-14, msg=key)
    for key in buf_s:
        torch.testing.assert_close(buf_s[key], buf_l[key], rtol=1e-12, atol=1e-14, msg=key)


def test_auto_task_batching_loops_only_in_large_cpu_training_steps() -> None:
    # first layer: 8 channels at stride 2; 4 tasks; 2 images of 32x64 -> 4 * 2 * 16 * 32 * 8 = 32768 elements
    images = torch.empty(2, 3, 32, 64)
    first = (8, 2)
    with mock.patch("polytask.models.etr_nlp.net.LOOP_ABOVE_ELEMENTS", 32768):
        assert choose_task_batching("auto", images, 4, first) == "stacked"
    with mock.patch("polytask.models.etr_nlp.net.LOOP_ABOVE_ELEMENTS", 32767):
        assert choose_task_batching("auto", images, 4, first) == "loop"
        assert choose_task_batching("auto", torch.empty(2, 3, 31, 63), 4, first) == "loop"  # odd sizes round up
        with torch.no_grad():
            assert choose_task_batching("auto", images, 4, first) == "stacked"
        assert choose_task_batching("auto", images.to("meta"), 4, first) == "stacked"  # not a CPU
        assert choose_task_batching("stacked", images, 4, first) == "stacked"
    assert choose_task_batching("loop", images, 4, first) == "loop"


def test_first_convolution_reads_the_plain_trunk() -> None:
    assert tiny_segnet().first_layer == (8, 1)
    assert create_model("etr_nlp_resnet18", attribute_tasks(), **TINY_RESNET).first_layer == (64, 2)  # timm's stem conv1


def test_auto_task_batching_calls_the_trunk_once_per_task_in_large_training_steps() -> None:
    net = tiny_segnet().train()
    calls: list[int] = []
    net.trunk.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    images = torch.randn(2, 3, 32, 32)
    elements = 3 * 2 * 32 * 32 * 8
    with mock.patch("polytask.models.etr_nlp.net.LOOP_ABOVE_ELEMENTS", elements - 1):
        net(images)
        assert calls == [2, 2, 2]
        calls.clear()
        with torch.no_grad():
            net(images)
        assert calls == [6]
        calls.clear()
    with mock.patch("polytask.models.etr_nlp.net.LOOP_ABOVE_ELEMENTS", elements):
        net(images)
    assert calls == [6]


def test_task_batching_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="task_batching must be one of"):
        tiny_segnet(task_batching="parallel")


def test_batched_mode_updates_each_task_running_statistics_like_per_task_mode() -> None:
    images = torch.randn(2, 3, 32, 32)
    batched, per_task = tiny_segnet().train(), tiny_segnet().train()
    batched(images)
    for name in per_task.task_names:
        per_task.forward_task(images, name)
    for (name, a), b in zip(batched.named_buffers(), per_task.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpoint_restores_outputs_into_a_model_built_with_another_seed() -> None:
    images = torch.randn(2, 3, 32, 32)
    source = tiny_segnet(seed=0).eval()
    expected = source(images)
    target = tiny_segnet(seed=1).eval()
    assert not torch.allclose(target(images)["depth"], expected["depth"])  # the primitives depend on the seed
    target.load_state_dict(source.state_dict())
    for name, value in target(images).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_routing_rejects_options_its_kind_does_not_use() -> None:
    with pytest.raises(ValueError, match="gamma"):
        Routing("hard_sharing", gamma=0.9)
    with pytest.raises(ValueError, match="unknown routing"):
        Routing("soft")  # type: ignore[arg-type]
    assert Routing("etr_nlp").gamma == 0.9 and Routing("task_routing").active_ratio == 0.5


def test_shared_networks_run_the_trunk_once_and_have_no_task_parameters() -> None:
    for name in ("hard_sharing_segnet", "nlp_segnet"):
        net = create_model(name, dense_tasks(), **TINY_SEGNET)
        assert isinstance(net, RoutedNet) and not net.routing.task_conditioned
        assert net.param_groups()["task_specific"] == []
        assert not any(isinstance(m, TaskBatchNorm) for m in net.modules())


class CountingAdam(torch.optim.Adam):
    steps = 0

    def step(self, closure=None):  # type: ignore[no-untyped-def]
        CountingAdam.steps += 1
        return super().step(closure)


def test_per_task_module_steps_the_optimizer_once_per_task_per_batch() -> None:
    data = DigitsDataModule(num_train=8, num_val=4, scale=1, batch_size=4)
    module = PerTaskModule(
        net=lambda tasks: RoutedResNet(tasks, routing="etr_nlp", **TINY_RESNET),
        tasks=data.tasks,
        default_loss_weights=data.loss_weights,
        optimizer=lambda params: CountingAdam(params, lr=1e-3),
        lr_schedule="constant",
    )
    calls: list[str] = []
    forward_task = module.net.forward_task
    module.net.forward_task = lambda images, name: calls.append(name) or forward_task(images, name)  # type: ignore[method-assign]
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
    )
    CountingAdam.steps = 0
    trainer.fit(module, datamodule=data)
    num_batches, tasks = 2, data.task_names
    assert CountingAdam.steps == num_batches * len(tasks)
    assert trainer.global_step == num_batches * len(tasks)
    assert calls == tasks * num_batches


def test_segnet_unpooling_equals_max_unpool2d_and_runs_in_deterministic_mode() -> None:
    x = torch.randn(2, 3, 7, 10)
    pooled, indices = torch.nn.functional.max_pool2d(x, 2, 2, return_indices=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)  # an earlier deterministic Lightning run may have left it on
    try:
        expected = torch.nn.functional.max_unpool2d(pooled, indices, 2, 2, output_size=(7, 10))
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.testing.assert_close(max_unpool(pooled, indices, (7, 10)), expected, rtol=0, atol=0)
    net = create_model("hard_sharing_segnet", dense_tasks(), **TINY_SEGNET)
    torch.use_deterministic_algorithms(True)
    try:
        net(torch.randn(2, 3, 32, 32))["depth"].mean().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize(
    ("configs", "expected"),
    [
        (["configs/etr_nlp_digits.yaml"], ("RoutedResNet", "etr_nlp", 4)),
        (["configs/etr_nlp_synthscenes.yaml"], ("RoutedSegNet", "etr_nlp", 4)),
        (["configs/etr_nlp_cityscapes.yaml", "configs/etr_nlp_cityscapes_binary.yaml"], ("RoutedSegNet", "etr_nlp", 8)),
        (["configs/etr_nlp_cityscapes.yaml", "configs/etr_nlp_baseline_hard_sharing_segnet.yaml"], ("RoutedSegNet", "hard_sharing", 2)),
    ],
)
def test_configs_build_the_intended_network(configs: list[str], expected: tuple[str, str, int]) -> None:
    cli = instantiate([str(REPO / c) for c in configs], ["--trainer.logger", "false"])
    net = cli.model.net
    assert (type(net).__name__, net.routing.kind, len(net.tasks)) == expected


# Learnable parameters and the float64 sum of |outputs| (seeded weights, primitives and input) of every registered
# routed network, measured with the classes they replaced (ETRNLPSegNet, ..., SingleTaskResNet18; issue 14).
FORMER_CLASSES = {
    "etr_nlp_segnet": (20343, 9567.015006269958),
    "etr_segnet": (54143, 10060.57346852463),
    "nlp_segnet": (15719, 10667.629281383131),
    "task_routing_segnet": (42759, 6023.905778865063),
    "hard_sharing_segnet": (42759, 10272.709790582474),
    "single_task_segnet": (124647, 9795.420423328575),
    "etr_nlp_resnet18": (17814, 3.742847087746783),
    "etr_resnet18": (51582, 4.367307994885291),
    "nlp_resnet18": (12072, 5.760308823765891),
    "task_routing_resnet18": (37032, 3.847182521674),
    "hard_sharing_resnet18": (37032, 4.092516181673346),
    "single_task_resnet18": (147720, 5.568356529052501),
    "etr_nlp_timm_resnet": (17635, 5902.456136366161),
}


def seeded_variant(name: str, build: Callable[..., RoutedNet] | None = None) -> tuple[RoutedNet, dict[str, torch.Tensor]]:
    """The registered network ``name`` (or ``build(tasks, **options)``) with tiny widths, seeded, in float64, and
    its outputs for a seeded ``(2, 3, 32, 32)`` batch in training mode."""
    tasks = attribute_tasks() if name.endswith("resnet18") else dense_tasks()
    options: dict = {**(TINY_RESNET if "resnet" in name else TINY_SEGNET), "seed": 1}
    if name == "etr_nlp_timm_resnet":
        options.update(decoder_channels=8, head_channels=4)
    torch.manual_seed(0)
    net = (build or MODEL_REGISTRY[name])(tasks, **options).double().train()
    with torch.no_grad():
        return net, net(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))


def test_routed_networks_keep_the_parameters_and_outputs_of_the_classes_they_replaced() -> None:
    assert {n for n in MODEL_REGISTRY if n.endswith(("_segnet", "_resnet18")) or n == "etr_nlp_timm_resnet"} == set(FORMER_CLASSES)
    for name, (params, total) in FORMER_CLASSES.items():
        net, outputs = seeded_variant(name)
        assert sum(p.numel() for p in net.parameters()) == params, name
        assert sum(o.abs().sum().item() for o in outputs.values()) == pytest.approx(total, rel=1e-9), name


@pytest.mark.parametrize("kind", get_args(RoutingKind))
@pytest.mark.parametrize(("architecture", "suffix"), [(RoutedSegNet, "segnet"), (RoutedResNet, "resnet18")])
def test_a_registered_variant_is_its_architecture_with_the_routing_argument(
    architecture: type[RoutedNet], suffix: str, kind: str
) -> None:
    name = f"{kind}_{suffix}"
    variant, variant_outputs = seeded_variant(name)
    direct, direct_outputs = seeded_variant(name, lambda tasks, **options: architecture(tasks, routing=kind, **options))
    assert type(variant) is architecture and variant.routing == direct.routing and variant.routing.kind == kind
    assert variant.state_dict().keys() == direct.state_dict().keys()
    for key, value in variant.state_dict().items():
        assert torch.equal(value, direct.state_dict()[key]), key
    for task, output in variant_outputs.items():
        torch.testing.assert_close(output, direct_outputs[task], rtol=0, atol=0)
