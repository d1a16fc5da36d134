"""TaskExpert's dense heads: the ``project`` head layer by layer, its factorisation, defaults and config pinning."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from polytask.models.taskexpert import TaskExpert, TaskHead
from polytask.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (32, 48)
BACKBONE = {"img_size": IMAGE, "embed_dim": 32, "depth": 4, "num_heads": 2}


def randomise_batchnorm(head: nn.Module, seed: int = 3) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics, so that eval mode tests them."""
    g = torch.Generator().manual_seed(seed)
    for m in head.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g, dtype=m.running_mean.dtype))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=m.running_var.dtype))


def memory_map(channels: int = 16, size: tuple[int, int] = (2, 3)) -> torch.Tensor:
    return torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("scale", [1, 2, 4])
@pytest.mark.parametrize("training", [False, True])
def test_project_head_equals_the_hand_built_sequence_of_its_layers(scale: int, training: bool) -> None:
    """Conv1x1 (no bias) on the token grid -> bilinear x scale -> Conv3x3-BN-GELU -> Conv1x1 -> bilinear."""
    torch.manual_seed(0)
    head = TaskHead(16, 5, 6, kind="project", scale=scale).double()
    randomise_batchnorm(head)
    proj = nn.Conv2d(16, 6, 1, bias=False).double()
    conv = nn.Conv2d(6, 6, 3, padding=1, bias=False).double()
    norm = nn.BatchNorm2d(6).double()
    out = nn.Conv2d(6, 5, 1).double()
    proj.load_state_dict(head.proj.state_dict())
    conv.load_state_dict(head.body[0].state_dict())
    norm.load_state_dict(head.body[1].state_dict())
    out.load_state_dict(head.out.state_dict())
    for m in (head, norm):
        m.train(training)
    x, size = memory_map(), (30, 45)
    y = proj(x)
    if scale > 1:
        y = F.interpolate(y, scale_factor=float(scale), mode="bilinear", align_corners=False)
    y = F.interpolate(out(F.gelu(norm(conv(y)))), size=size, mode="bilinear", align_corners=False)
    assert torch.equal(head(x, size), y)
    assert y.shape == (2, 5, *size)
    assert head.proj.bias is None and head.body[0].bias is None
    assert [tuple(p.shape) for p in head.parameters()] == [
        (6, 16, 1, 1), (6, 6, 3, 3), (6,), (6,), (5, 6, 1, 1), (5,)
    ]


@pytest.mark.parametrize("scale", [1, 4])
def test_project_head_is_the_bilinear_head_with_its_3x3_conv_factored_through_the_hidden_width(scale: int) -> None:
    """A 1x1 conv commutes with bilinear upsampling: ``project`` = ``bilinear`` whose 3x3 weight is W3 @ P."""
    torch.manual_seed(0)
    project = TaskHead(16, 5, 6, kind="project", scale=scale).double().eval()
    randomise_batchnorm(project)
    bilinear = TaskHead(16, 5, 6, kind="bilinear", scale=scale).double().eval()
    state = {k: v for k, v in project.state_dict().items() if not k.startswith("proj.")}
    state["body.0.weight"] = torch.einsum("ohyx,hi->oiyx", project.body[0].weight, project.proj.weight[:, :, 0, 0])
    bilinear.load_state_dict(state)
    x, size = memory_map(), (30, 45)
    torch.testing.assert_close(project(x, size), bilinear(x, size), rtol=1e-12, atol=1e-12)


def tasks() -> list:
    return [build_task("semseg", num_classes=5), build_task("normals"),
            build_task("attributes", name="mouth", attribute_names=["a", "b"])]


def tiny(**options: object) -> TaskExpert:
    torch.manual_seed(0)
    return TaskExpert(tasks(), backbone="vit_tiny_patch16_224", backbone_options=dict(BACKBONE),
                      **{"num_experts": 3, "width": 16, **options})


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_project_heads_in_taskexpert_give_every_shape_and_train_every_parameter(scale: int) -> None:
    net = tiny(head="project", head_channels=6, head_scale=scale).train()
    images = torch.randn(2, 3, 30, 45, generator=torch.Generator().manual_seed(1))  # off the patch grid
    out = net(images)
    assert out["semseg"].shape == (2, 5, 30, 45) and out["normals"].shape == (2, 3, 30, 45)
    assert out["mouth"].shape == (2, 2)
    g = torch.Generator().manual_seed(2)
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in out.values()).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert net.heads["semseg"].proj.weight.shape == (6, 16, 1, 1)


def test_project_heads_in_channels_last_match_contiguous_heads() -> None:
    fast, plain = tiny(head="project", channels_last=True).eval(), tiny(head="project", channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    assert fast.heads["semseg"].proj.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, *IMAGE, generator=torch.Generator().manual_seed(1))
    a, b = fast(x), plain(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_default_head_is_project_at_a_quarter_of_the_memory_width_at_quarter_resolution() -> None:
    net = tiny()
    head = net.heads["semseg"]
    assert (head.kind, head.scale, head.proj.out_channels, head.out.in_channels) == ("project", 4, 4, 4)
    assert tiny(width=10).heads["semseg"].out.in_channels == 2  # floor(D / 4)
    assert tiny(width=3).heads["semseg"].out.in_channels == 1  # at least one channel
    # bilinear and deconv keep D hidden channels by default, as before
    assert tiny(head="bilinear").heads["semseg"].out.in_channels == 16
    assert tiny(head="deconv", channels_last=False).heads["semseg"].out.in_channels == 16
    assert tiny(head_channels=7).heads["semseg"].out.in_channels == 7


def test_unknown_head_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown head kind 'mlp'; choose bilinear, project or deconv"):
        TaskHead(16, 5, 6, kind="mlp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head scale must be >= 1"):
        TaskHead(16, 5, 6, kind="project", scale=0)
    with pytest.raises(ValueError, match="head hidden channels must be >= 1"):
        TaskHead(16, 5, 0, kind="project")


def net_args(config: str) -> dict:
    data = yaml.safe_load((ROOT / config).read_text())
    model = data["model"]
    return (model.get("init_args", model))["net"]["init_args"]


@pytest.mark.parametrize("config", [
    "src/polytask/main_job.yaml", "configs/taskexpert_synthscenes.yaml", "configs/taskexpert_static_synthscenes.yaml",
])
def test_the_main_job_and_synthscenes_configs_keep_the_bilinear_heads_their_results_were_measured_with(config: str) -> None:
    assert net_args(config)["head"] == "bilinear"


@pytest.mark.parametrize("config, head_channels", [
    ("configs/taskexpert_pascal_vitl.yaml", 128), ("configs/taskexpert_nyud_vitl.yaml", 128),
    ("configs/taskexpert_pascal_vitb.yaml", 64), ("configs/taskexpert_nyud_vitb.yaml", 64),
])
def test_paper_configs_use_the_project_head_at_a_quarter_of_the_memory_width(config: str, head_channels: int) -> None:
    args = net_args(config)
    assert (args["head"], args["head_channels"], args["head_scale"]) == ("project", head_channels, 4)
    assert args["head_channels"] * 4 == args["width"]
