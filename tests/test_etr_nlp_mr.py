"""ETR-NLP issue 12: the task branch, the NLP-only baseline's grouping, Task Routing and SegNet as Maximum Roaming
implements them, binary segmentation as Maximum Roaming trains it, and the paper configs' protocol."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from polytask.config import instantiate
from polytask.data.datasets.celeba import ATTRIBUTE_GROUPS
from polytask.data.datasets.mtan import segmentation_tasks
from polytask.models.etr_nlp import (
    BlockBatchNorm,
    NLPBlock,
    RoutedConv,
    RoutedSegNet,
    TaskBatchNorm,
    TaskChannelMask,
)
from polytask.models.etr_nlp.layers import routing_masks
from polytask.models.etr_nlp.nlp import mix_groups
from polytask.tasks import BinarySegmentationTask, build_task

REPO = Path(__file__).resolve().parents[1]
TINY_SEGNET = {"filters": (8, 8, 16, 16, 16)}


def dense_tasks() -> list:
    return [build_task("semseg", num_classes=3), build_task("depth"), build_task("normals")]


def routed_convs(net: nn.Module) -> dict[str, RoutedConv]:
    return {name: m for name, m in net.named_modules() if isinstance(m, RoutedConv)}


def config_net(*configs: str) -> nn.Module:
    """The network of layered configs; CelebA's tasks built from its groups (its datamodule needs the files)."""
    if "celeba" not in configs[0]:
        return instantiate([str(REPO / c) for c in configs], ["--trainer.logger", "false"]).model.net
    class_path, init_args = "", {}
    for config in configs:
        net = yaml.safe_load((REPO / config).read_text())["model"]["net"]
        class_path = net.get("class_path", class_path)
        init_args.update(net.get("init_args") or {})
    tasks = [build_task("attributes", name=g, attribute_names=[str(i) for i in cols]) for g, cols in ATTRIBUTE_GROUPS.items()]
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)(tasks, **init_args)


def test_default_task_branch_mixes_the_shared_primitive_responses_per_task() -> None:
    torch.manual_seed(0)
    net = RoutedSegNet(dense_tasks(), routing="etr_nlp", **TINY_SEGNET).eval()
    convs = routed_convs(net)
    assert convs
    for conv in convs.values():
        assert conv.task_branch == "nlp" and isinstance(conv.shared, NLPBlock) and conv.task_convs is not None
        k = len(conv.shared.primitives)
        c_in = conv.shared.mix.in_channels // k
        for task_conv in conv.task_convs:
            assert task_conv.kernel_size == (1, 1) and task_conv.in_channels == k * c_in
            assert task_conv.groups == mix_groups(c_in, conv.task_channels, None)
    conv = net.trunk.encoder_block[2][0]
    x = torch.randn(2, conv.shared.mix.in_channels // len(conv.shared.primitives), 8, 8)
    with net.router.route([1]):
        y = conv(x)
    responses = conv.shared.responses(x)
    torch.testing.assert_close(y, torch.cat([conv.shared.mix(responses), conv.task_convs[1](responses)], dim=1))


def test_nlp_task_branch_has_fewer_learnable_parameters_than_the_conv_task_branch() -> None:
    def learnable(branch: str) -> int:
        return sum(p.numel() for p in RoutedSegNet(dense_tasks(), routing="etr_nlp", task_branch=branch, **TINY_SEGNET).parameters())

    assert learnable("nlp") < learnable("conv")
    with pytest.raises(ValueError, match="task_branch"):
        RoutedSegNet(dense_tasks(), routing="etr_nlp", task_branch="mlp", **TINY_SEGNET)


@pytest.mark.parametrize(
    ("base", "overlay"),
    [
        ("configs/etr_nlp_celeba.yaml", "configs/etr_nlp_baseline_nlp_resnet18.yaml"),
        ("configs/etr_nlp_nyuv2.yaml", "configs/etr_nlp_baseline_nlp_segnet.yaml"),
    ],
)
def test_nlp_only_baseline_mixes_in_the_groups_of_the_etr_nlp_shared_mix(base: str, overlay: str) -> None:
    etr_nlp, nlp_only = routed_convs(config_net(base)), routed_convs(config_net(base, overlay))
    assert etr_nlp.keys() == nlp_only.keys() and len(etr_nlp) >= 20
    for name, conv in nlp_only.items():
        assert conv.task_convs is None and conv.shared_channels == conv.out_channels
        assert isinstance(conv.shared, NLPBlock) and isinstance(etr_nlp[name].shared, NLPBlock)
        assert conv.shared.mix.groups == etr_nlp[name].shared.mix.groups, name


def test_task_routing_shares_one_batch_norm_and_masks_per_task() -> None:
    net = RoutedSegNet(dense_tasks(), routing="task_routing", active_ratio=0.6, **TINY_SEGNET)
    assert not any(isinstance(m, TaskBatchNorm) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, BlockBatchNorm)]
    masks = [m for m in net.modules() if isinstance(m, TaskChannelMask)]
    assert norms and len(norms) == len(masks)
    assert all(n.weight.shape == (n.num_features,) for n in norms)  # one affine set for every task
    assert net.param_groups()["task_specific"] == []


@pytest.mark.parametrize(("tasks", "channels", "ratio"), [(3, 16, 0.6), (15, 64, 0.8), (8, 512, 0.9), (4, 3, 0.5)])
def test_routing_masks_cover_every_channel_and_keep_maximum_roamings_ratio(tasks: int, channels: int, ratio: float) -> None:
    masks = routing_masks(tasks, channels, ratio, seed=1)
    assert masks.shape == (tasks, channels) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.sum(0) >= 1).all()  # every channel belongs to some task
    zeros = channels - masks.sum(1)
    assert (zeros / channels <= 1 - ratio).all()  # Maximum Roaming's MR layer test
    floor = max(z for z in range(channels + 1) if z / channels <= 1 - ratio)
    covering = torch.tensor([len(range(t, channels, tasks)) for t in range(tasks)])
    assert torch.equal(zeros, torch.minimum(torch.full((tasks,), float(floor)), channels - covering.float()))
    assert torch.equal(masks, routing_masks(tasks, channels, ratio, seed=1))


@pytest.mark.parametrize(
    ("configs", "ratio"),
    [
        (["configs/etr_nlp_celeba.yaml", "configs/etr_nlp_baseline_task_routing_resnet18.yaml"], 0.9),
        (["configs/etr_nlp_nyuv2.yaml", "configs/etr_nlp_baseline_task_routing_segnet_nyuv2.yaml"], 0.8),
        (["configs/etr_nlp_cityscapes.yaml", "configs/etr_nlp_baseline_task_routing_segnet_cityscapes.yaml"], 0.6),
    ],
)
def test_task_routing_overlays_use_maximum_roamings_ratio_per_dataset(configs: list[str], ratio: float) -> None:
    net = config_net(*configs)
    assert net.routing.active_ratio == ratio
    for mask in (m for m in net.modules() if isinstance(m, TaskChannelMask)):
        assert (mask.mask.mean(1) >= ratio - 1e-9).all()


def test_segnet_batch_norm_without_running_statistics_uses_batch_statistics_in_evaluation() -> None:
    torch.manual_seed(0)
    net = RoutedSegNet(dense_tasks(), routing="etr_nlp", running_stats=False, **TINY_SEGNET).eval()
    norms = [m for m in net.modules() if isinstance(m, TaskBatchNorm)]
    assert norms and all(n.running_mean is None for n in norms)
    images = torch.randn(4, 3, 32, 32)
    alone = net.forward_task(images[:2], "depth")
    together = net.forward_task(images, "depth")[:2]
    assert not torch.allclose(alone, together)  # evaluation normalises with the batch's statistics


@pytest.mark.parametrize("dataset", ["nyuv2", "cityscapes"])
def test_mr_protocol_configs_follow_maximum_roaming(dataset: str) -> None:
    config = f"configs/etr_nlp_{dataset}.yaml"
    net = config_net(config)
    norms = [m for m in net.modules() if isinstance(m, TaskBatchNorm | nn.BatchNorm2d)]
    assert norms and not any(n.track_running_stats for n in norms)
    trainer = yaml.safe_load((REPO / config).read_text())["trainer"]
    assert (trainer["max_epochs"], trainer["check_val_every_n_epoch"]) == (500, 5)
    binary = config_net(config, f"configs/etr_nlp_{dataset}_binary.yaml")
    seg = [t for t in binary.tasks if t.name.startswith("seg_")]
    assert seg and all(isinstance(t, BinarySegmentationTask) and binary.heads[t.name].body[-1].out_channels == 1 for t in seg)


def test_binary_segmentation_loss_is_maximum_roamings_bce_with_unlabelled_pixels_negative() -> None:
    task = segmentation_tasks(["a", "b", "c"], "binary")[1]
    assert isinstance(task, BinarySegmentationTask) and task.out_channels == 1 and task.num_classes == 2
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 5, 6)
    labels = torch.randint(-1, 3, (2, 5, 6))  # multi-class labels, -1 = no label (MTAN)
    target = torch.where(labels == -1, 255, (labels == 1).long())
    one_hot = torch.zeros(2, 4, 5, 6).scatter_(1, (labels + 1).unsqueeze(1), 1.0)[:, 1:]  # Maximum Roaming's labels
    expected = F.binary_cross_entropy(torch.sigmoid(logits), one_hot[:, 1:2])
    torch.testing.assert_close(task.loss(logits, target), expected)
    valid = target != 255
    ignoring = BinarySegmentationTask("seg_b", unlabelled="ignore").loss(logits, target)
    torch.testing.assert_close(ignoring, F.binary_cross_entropy_with_logits(logits[:, 0][valid], target[valid].float()))
    assert torch.equal(task.postprocess(logits), (torch.sigmoid(logits[:, 0]) >= 0.5).long())


def test_docs_name_only_existing_configs() -> None:
    text = (REPO / "docs/etr-nlp.md").read_text()
    named = set(re.findall(r"configs/[\w./-]+?\.yaml", text))
    assert named and all((REPO / c).is_file() for c in named), sorted(c for c in named if not (REPO / c).is_file())
