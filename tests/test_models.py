"""Backbones, heads and the baseline architectures."""

import pytest
import torch

from polytask.models import (
    HardSharing,
    PretrainedWeightsError,
    SingleTask,
    TimmBackbone,
    create_model,
)
from polytask.models.etr_nlp import RoutedSegNet
from polytask.tasks import build_task


def small_tasks() -> list:
    return [
        build_task("semseg", num_classes=5),
        build_task("normals"),
        build_task("depth"),
        build_task("edge"),
        build_task("sal"),
        build_task("attributes", name="mouth", attribute_names=["a", "b", "c"]),
    ]


def test_hard_sharing_outputs_every_task_at_input_size() -> None:
    torch.manual_seed(0)
    net = HardSharing(small_tasks(), backbone="resnet18", decoder_channels=16, head_channels=8).eval()
    images = torch.randn(2, 3, 64, 96)
    out = net(images)
    assert out["semseg"].shape == (2, 5, 64, 96)
    assert out["normals"].shape == (2, 3, 64, 96)
    assert out["depth"].shape == (2, 1, 64, 96)
    assert out["edge"].shape == (2, 1, 64, 96)
    assert out["sal"].shape == (2, 2, 64, 96)
    assert out["mouth"].shape == (2, 3)
    # the heads differ: each task has its own parameters on the shared feature
    assert not torch.allclose(out["depth"], out["edge"])


def test_hard_sharing_shares_backbone_gradients_from_every_task() -> None:
    tasks = small_tasks()[:2]
    net = HardSharing(tasks, backbone="resnet18", decoder_channels=16, head_channels=8)
    out = net(torch.randn(2, 3, 32, 32))
    out["normals"].sum().backward()
    assert all(p.grad is None for p in net.heads["semseg"].parameters())
    assert net.backbone.body.conv1.weight.grad.abs().sum() > 0


def _vit_hard_sharing(dynamic: bool) -> HardSharing:
    torch.manual_seed(0)
    options = {"img_size": [32, 32], "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    if dynamic:
        options["dynamic_img_size"] = True
    tasks = [build_task("semseg", num_classes=5), build_task("depth"), build_task("attributes", name="mouth", attribute_names=["a", "b"])]
    return HardSharing(
        tasks, backbone="vit_tiny_patch16_224", out_indices=[0, 1], decoder_channels=8, head_channels=4, backbone_options=options
    ).eval()


def test_vit_hard_sharing_takes_any_size_when_dynamic_padding_off_grid_sizes() -> None:
    fixed, dynamic = _vit_hard_sharing(False), _vit_hard_sharing(True)
    dynamic.load_state_dict(fixed.state_dict())  # dynamic_img_size adds no parameters
    images = torch.randn(2, 3, 32, 32)
    for name, out in fixed(images).items():  # at the built size both give the same outputs
        assert torch.equal(dynamic(images)[name], out), name
    odd = torch.randn(2, 3, 35, 50)  # off the 8-pixel grid: padded to 40x56, cropped back
    out = dynamic(odd)
    assert out["semseg"].shape == (2, 5, 35, 50) and out["depth"].shape == (2, 1, 35, 50) and out["mouth"].shape == (2, 2)
    padded = dynamic(torch.nn.functional.pad(odd, (0, 6, 0, 5)))
    torch.testing.assert_close(out["depth"], padded["depth"][..., :35, :50])
    torch.testing.assert_close(out["mouth"], padded["mouth"])
    assert dynamic.backbone.patch_grid == (8, 8) and fixed.backbone.patch_grid is None


def test_vit_hard_sharing_built_for_one_size_names_the_option_for_others() -> None:
    with pytest.raises(ValueError, match=r"built for 32x32 inputs and got 48x64; set backbone_options.dynamic_img_size: true"):
        _vit_hard_sharing(False)(torch.randn(1, 3, 48, 64))


def test_single_task_builds_one_network_per_task() -> None:
    tasks = small_tasks()[:3]
    single = SingleTask(tasks, backbone="resnet18", decoder_channels=16, head_channels=8)
    shared = HardSharing(tasks, backbone="resnet18", decoder_channels=16, head_channels=8)
    n_single = sum(p.numel() for p in single.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    n_backbone = sum(p.numel() for p in shared.backbone.parameters())
    assert n_single > n_shared + n_backbone
    out = single.eval()(torch.randn(1, 3, 32, 32))
    assert set(out) == {"semseg", "normals", "depth"}
    assert set(single.param_groups()) == {"backbone", "decoder", "heads"}


def test_vit_backbone_returns_maps_from_chosen_blocks() -> None:
    bb = TimmBackbone("vit_tiny_patch16_224", out_indices=(1, 3), img_size=(32, 48), depth=4)
    feats = bb(torch.randn(1, 3, 32, 48))
    assert [f.shape for f in feats] == [torch.Size([1, 192, 2, 3])] * 2
    assert bb.reductions == [16, 16]


def test_registry_creates_models_and_rejects_unknown() -> None:
    net = create_model("hard_sharing", small_tasks()[:1], decoder_channels=8, head_channels=8)
    assert isinstance(net, HardSharing)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope", small_tasks())


def test_pretrained_offline_error_says_how_to_run_offline(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsError, match="--model.init_args.net.init_args.pretrained false") as info:
        TimmBackbone("resnet18", pretrained=True)
    assert "resnet18" in str(info.value)
    with pytest.raises(PretrainedWeightsError, match="missing.safetensors"):
        TimmBackbone("resnet18", pretrained_file=str(tmp_path / "missing.safetensors"))


def test_declared_network_interface_defaults_and_overrides() -> None:
    """What training and benchmarking ask a network for: defaults of the base class, and the
    overrides of the networks that have the capability."""
    tasks = [build_task("semseg", num_classes=3), build_task("depth")]
    torch.manual_seed(0)
    hard = HardSharing(tasks, backbone="resnet18", pretrained=False, decoder_channels=8, head_channels=4).eval()
    images = torch.randn(2, 3, 32, 32)
    assert hard.per_task_mode is False and hard.image_size is None and hard.aux_loss() is None
    assert hard.shared_backbone() is hard.backbone
    assert hard.display_name == "HardSharing"
    torch.testing.assert_close(hard.forward_task(images, "depth"), hard(images)["depth"], rtol=0, atol=0)

    routed = RoutedSegNet(tasks, routing="etr_nlp", filters=[8, 8, 16, 16, 16]).eval()
    assert routed.per_task_mode is True and routed.shared_backbone() is routed.trunk
    assert routed.display_name == "RoutedSegNet[etr_nlp]"
