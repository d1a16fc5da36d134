"""TaskExpert: shapes, gates, memory, batched experts, checkpoints, autocast, compile, diagnostics, summary."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from polytask.cli.experts import main as experts_main
from polytask.cli.summary import main as summary_main
from polytask.diagnostics import ExpertUsageMonitor, GateUsage, dominant_expert_maps
from polytask.models.taskexpert import ExpertBank, MMoELayer, TaskExpert, balance_loss, default_mmoe_blocks
from polytask.tasks import build_task

IMAGE = (32, 48)
BACKBONE = {"img_size": IMAGE, "embed_dim": 32, "depth": 4, "num_heads": 2}
SYNTH_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "taskexpert_synthscenes.yaml")


def tasks() -> list:
    return [
        build_task("semseg", num_classes=5),
        build_task("normals"),
        build_task("edge"),
        build_task("attributes", name="mouth", attribute_names=["a", "b", "c"]),
    ]


def tiny(seed: int = 0, **options: object) -> TaskExpert:
    torch.manual_seed(seed)
    return TaskExpert(tasks(), backbone="vit_tiny_patch16_224", backbone_options=dict(BACKBONE),
                      num_experts=3, width=16, head_channels=8, **options)


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *IMAGE, generator=torch.Generator().manual_seed(1))


def random_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss whose gradient reaches every output element with a different weight."""
    g = torch.Generator().manual_seed(2)
    return sum((o * torch.randn(o.shape, generator=g)).sum() for o in out.values())


VARIANTS = [
    {},
    {"expert": "mlp2"},
    {"expert": "conv"},
    {"gate_input": "tokens"},
    {"gate_input": "tokens+memory", "memory_init": "zeros"},
    {"gate_granularity": "image", "gate_temperature": 0.5, "gate_noise": 0.1},
    {"memory_write": "accumulate"},
    {"memory_write": "ema", "memory_momentum": 0.3},
    {"memory_read": False},
    {"memory_read": False, "memory_write": "accumulate"},
    {"memory_read": False, "memory_write": "ema", "memory_momentum": 0.3},
    {"gating": "static", "memory_read": False},
    {"head": "bilinear"},
    {"head": "deconv", "channels_last": False},
    {"head_scale": 1},
    {"mmoe_blocks": [2, 4], "final_norm_on_last": False},
]



def variant_id(options: dict) -> str:
    """Test id of a switch combination: ``key=value`` pairs, or ``default``."""
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


@pytest.mark.parametrize("options", VARIANTS, ids=variant_id)
def test_every_task_gets_its_output_shape(options: dict) -> None:
    net = tiny(**options).train()
    out = net(images())
    assert set(out) == {"semseg", "normals", "edge", "mouth"}
    assert out["semseg"].shape == (2, 5, *IMAGE)
    assert out["normals"].shape == (2, 3, *IMAGE)
    assert out["edge"].shape == (2, 1, *IMAGE)
    assert out["mouth"].shape == (2, 3)
    assert all(torch.isfinite(o).all() for o in out.values())


@pytest.mark.parametrize("options", VARIANTS, ids=variant_id)
def test_gradients_reach_every_expert_gate_memory_path_and_head(options: dict) -> None:
    """Every variant, the no-memory ones included: each MMoE layer's features must reach the heads."""
    net = tiny(**options).train()
    random_loss(net(images())).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    if options.get("gate_input") == "tokens+memory":
        assert net.mmoe[0].gates.memory_proj is None  # the first layer's memory is all zeros
        assert all(layer.gates.memory_proj is not None for layer in net.mmoe[1:])


def test_gate_weights_sum_to_one_over_experts_and_memory() -> None:
    net = tiny()
    net.record_gates = True
    net(images())
    assert [r.shape for r in net.gate_record] == [(2, 4, 3, 2, 3)] + [(2, 4, 4, 2, 3)] * 3
    for record in net.gate_record:
        torch.testing.assert_close(record.sum(dim=2), torch.ones(2, 4, 2, 3))
        assert (record >= 0).all()
    assert net.gate_slot_names() == [["e0", "e1", "e2"]] + [["e0", "e1", "e2", "memory"]] * 3


def test_zero_memory_init_gives_the_first_layer_a_memory_slot() -> None:
    net = tiny(memory_init="zeros")
    assert [layer.gates.num_slots for layer in net.mmoe] == [4, 4, 4, 4]


def test_no_memory_removes_the_slot_and_changes_the_outputs() -> None:
    with_memory, without = tiny().eval(), tiny(memory_read=False).eval()
    assert [layer.gates.num_slots for layer in without.mmoe] == [3, 3, 3, 3]
    assert all(names == ["e0", "e1", "e2"] for names in without.gate_slot_names())
    state = with_memory.state_dict()
    shared = {k: v for k, v in state.items() if without.state_dict()[k].shape == v.shape}
    for i in range(1, 4):  # gates of the later layers: keep the expert rows, drop the memory row
        for name in ("token_proj.weight", "token_proj.bias", "context_proj.weight"):
            key = f"mmoe.{i}.gates.{name}"
            shared[key] = state[key].unflatten(0, (4, 4))[:, :3].flatten(0, 1)
    without.load_state_dict(shared, strict=True)
    with_memory.record_gates = without.record_gates = True
    x = images()
    a, b = with_memory(x), without(x)
    torch.testing.assert_close(with_memory.gate_record[0], without.gate_record[0])  # same weights, same first layer
    assert all(not torch.allclose(a[k], b[k]) for k in a)


def reference_experts(bank: ExpertBank, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-expert Python loop: ``(B, L, C)`` -> ``(B, L, N, D)``."""
    outs = []
    for n in range(bank.num_experts):
        x = tokens
        if bank.kind == "conv":
            b, length, c = tokens.shape
            image = tokens.transpose(1, 2).reshape(b, c, *grid)
            x = F.conv2d(image, bank.depthwise[:, n].unsqueeze(1), bank.depthwise_bias[:, n], padding=1, groups=c)
            x = x.flatten(2).transpose(1, 2)
        h = F.linear(x, bank.weight[n], bank.bias[n])
        if bank.kind == "mlp2":
            h = F.linear(F.gelu(h), bank.weight2[n], bank.bias2[n])
        h = F.layer_norm(h, (bank.width,), bank.norm_weight[n], bank.norm_bias[n])
        outs.append(F.gelu(h))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("kind", ["mlp", "mlp2", "conv"])
def test_batched_experts_equal_a_per_expert_loop(kind: str) -> None:
    torch.manual_seed(0)
    bank = ExpertBank(24, 16, 5, kind)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0, 0.3)
    tokens = torch.randn(2, 12, 24)
    torch.testing.assert_close(bank(tokens, (3, 4)), reference_experts(bank, tokens, (3, 4)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gate_input", ["tokens+context", "tokens+memory"])
def test_mmoe_layer_equals_a_per_task_per_expert_loop(gate_input: str) -> None:
    torch.manual_seed(0)
    layer = MMoELayer(24, 16, num_tasks=3, num_experts=4, reads_memory=True, gate_input=gate_input).eval()
    tokens, memory = torch.randn(2, 12, 24), torch.randn(2, 12, 3, 16)
    new_memory, gates = layer(tokens, memory, (3, 4))
    experts = reference_experts(layer.experts, tokens, (3, 4))
    g = layer.gates
    pooled = tokens.mean(dim=1, keepdim=True)
    for t in range(3):
        rows = slice(t * 5, (t + 1) * 5)
        logits = F.linear(tokens, g.token_proj.weight[rows], g.token_proj.bias[rows])
        if g.context_proj is not None:
            logits = logits + F.linear(pooled, g.context_proj.weight[rows])
        if g.memory_proj is not None:
            logits = logits + F.linear(memory[:, :, t], g.memory_proj[t])
        weights = logits.softmax(dim=-1)
        torch.testing.assert_close(gates[:, :, t], weights, atol=1e-5, rtol=1e-5)
        fused = weights[..., 4:5] * memory[:, :, t]
        for n in range(4):
            fused = fused + weights[..., n : n + 1] * experts[:, :, n]
        torch.testing.assert_close(new_memory[:, :, t], fused, atol=1e-5, rtol=1e-5)


def test_without_the_memory_slot_the_memory_is_carried_with_weight_one() -> None:
    torch.manual_seed(0)
    layer = MMoELayer(24, 16, num_tasks=2, num_experts=3, reads_memory=False).eval()
    tokens, memory = torch.randn(2, 6, 24), torch.randn(2, 6, 2, 16)
    first, gates = layer(tokens, None, (2, 3))  # no memory yet: the gated experts alone
    assert gates.shape == (2, 6, 2, 3)
    torch.testing.assert_close(first, gates @ layer.experts(tokens, (2, 3)))
    torch.testing.assert_close(layer(tokens, memory, (2, 3))[0], first + memory)


def test_no_memory_ablation_decodes_from_every_mmoe_layer() -> None:
    """Changing the first layer's experts changes the outputs of the no-memory ablation."""
    net = tiny(memory_read=False).eval()
    x = images()
    before = net(x)
    with torch.no_grad():
        net.mmoe[0].experts.norm_bias.add_(1.0)
    after = net(x)
    assert all(not torch.allclose(before[k], after[k]) for k in before)


def test_memory_write_rules() -> None:
    torch.manual_seed(0)
    layer = MMoELayer(24, 16, num_tasks=2, num_experts=3, reads_memory=True).eval()
    tokens, memory = torch.randn(2, 6, 24), torch.randn(2, 6, 2, 16)
    fused, _ = layer(tokens, memory, (2, 3))
    layer.memory_write = "accumulate"
    torch.testing.assert_close(layer(tokens, memory, (2, 3))[0], memory + fused)
    layer.memory_write, layer.memory_momentum = "ema", 0.25
    torch.testing.assert_close(layer(tokens, memory, (2, 3))[0], 0.25 * memory + 0.75 * fused)


def test_checkpoint_round_trip_gives_identical_outputs() -> None:
    net = tiny(seed=0).eval()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = tiny(seed=5).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = images()
    a, b = net(x), fresh(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_forward_and_backward() -> None:
    net = tiny().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(images())
        loss = random_loss({k: v.float() for k, v in out.items()})
    loss.backward()
    assert out["semseg"].shape == (2, 5, *IMAGE)
    assert all(torch.isfinite(o.float()).all() for o in out.values())
    assert net.mmoe[0].experts.weight.grad.abs().sum() > 0


def test_compile_traces_the_whole_forward_without_graph_breaks() -> None:
    net = tiny().eval()
    x = images()
    compiled = torch.compile(net, backend="eager", fullgraph=True)
    reference, out = net(x), compiled(x)
    assert all(torch.equal(reference[k], out[k]) for k in reference)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager() -> None:
    net = tiny().eval()
    x = images()
    out = torch.compile(net, fullgraph=True)(x)
    reference = net(x)
    for k in reference:
        torch.testing.assert_close(out[k], reference[k], atol=1e-4, rtol=1e-4)


def test_channels_last_heads_match_contiguous_heads() -> None:
    fast, plain = tiny(channels_last=True).eval(), tiny(channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    assert fast.heads["semseg"].body[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = images()
    a, b = fast(x), plain(x)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_mmoe_blocks_defaults_and_validation() -> None:
    assert default_mmoe_blocks(24) == [6, 12, 18, 24]
    assert default_mmoe_blocks(12) == [3, 6, 9, 12]
    net = tiny(mmoe_blocks=[1, 3], final_norm_on_last=False)
    assert len(net.backbone.blocks) == 3 and isinstance(net.backbone.norm, torch.nn.Identity)
    assert net.image_size == IMAGE
    with pytest.raises(ValueError, match="outside 1..4"):
        tiny(mmoe_blocks=[0, 4])
    with pytest.raises(ValueError, match="needs memory_read"):
        tiny(gate_input="tokens+memory", memory_read=False)


def test_param_groups_partition_the_parameters() -> None:
    net = tiny()
    groups = net.param_groups()
    assert set(groups) == {"backbone", "mmoe", "heads"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(net.parameters()))


def test_balance_loss_by_hand_and_aux_loss() -> None:
    uniform = torch.full((2, 5, 3, 4), 0.25)
    assert balance_loss([uniform], 4).item() == pytest.approx(0.0)
    one_hot = torch.zeros(2, 5, 3, 3)
    one_hot[..., 0] = 1.0  # importance (1, 0) over 2 experts, the memory slot excluded: var 0.25 / mean^2 0.25
    assert balance_loss([one_hot], 2).item() == pytest.approx(1.0)
    assert tiny().aux_loss().item() == 0.0
    net = tiny(balance_weight=0.5).train()
    net(images())
    aux = net.aux_loss()
    assert aux.item() > 0
    aux.backward()
    assert net.mmoe[0].gates.token_proj.weight.grad.abs().sum() > 0


class FakeRecorder(torch.nn.Module):
    """Replays fixed gate records: two layers, tasks a and b."""

    def __init__(self, records: list[list[torch.Tensor]]) -> None:
        super().__init__()
        self.records = records
        self.record_gates = False
        self.gate_record: list[torch.Tensor] = []
        self.mmoe_blocks = [3, 6]
        self.learned_gates = True
        self.task_names = ["a", "b"]

    def gate_slot_names(self) -> list[list[str]]:
        return [["e0", "e1"], ["e0", "e1", "memory"]]

    def play(self, batch: int) -> None:
        self.gate_record = self.records[batch] if self.record_gates else []


def hand_records() -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Two batches of records and their means computed by hand."""
    first0 = torch.zeros(1, 2, 2, 1, 2)
    first0[:, 0, 0] = 1.0  # task a: expert 0 on both tokens
    first0[:, 1, :, :, 0] = torch.tensor([0.5, 0.5])[:, None]  # task b, token 0: half-half
    first0[:, 1, 1, :, 1] = 1.0  # task b, token 1: expert 1
    second0 = torch.zeros(1, 2, 2, 1, 2)
    second0[:, :, 1] = 1.0  # both tasks: expert 1 on both tokens
    layer1 = torch.full((1, 2, 3, 1, 2), 1 / 3)
    means0 = torch.tensor([[0.5, 0.5], [0.125, 0.875]], dtype=torch.float64)
    means1 = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    return [[first0, layer1], [second0, layer1]], [means0, means1]


def test_gate_usage_accumulates_means_over_images_and_tokens() -> None:
    records, means = hand_records()
    usage = GateUsage()
    for batch in records:
        usage.update(batch)
    for got, want in zip(usage.compute(), means):
        torch.testing.assert_close(got, want)


def test_expert_usage_monitor_logs_and_writes_the_means(tmp_path: Path) -> None:
    records, means = hand_records()
    net = FakeRecorder(records)
    logged: dict[str, float] = {}
    module = SimpleNamespace(net=net, log_dict=logged.update, device=torch.device("cpu"))
    trainer = SimpleNamespace(sanity_checking=False, log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              global_step=7, current_epoch=1, strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    monitor = ExpertUsageMonitor()
    monitor.on_validation_epoch_start(trainer, module)
    assert net.record_gates
    for i in range(2):
        net.play(i)
        monitor.on_validation_batch_end(trainer, module, None, None, i)
    monitor.on_validation_epoch_end(trainer, module)
    assert not net.record_gates
    assert logged["experts/block3/b/e1"] == pytest.approx(0.875)
    assert logged["experts/block6/a/memory"] == pytest.approx(1 / 3)
    payload = json.loads((tmp_path / "expert_usage" / "step0000007.json").read_text())
    assert payload["layers"][0]["block"] == 3
    assert payload["layers"][0]["mean_gate"]["b"] == pytest.approx({"e0": 0.125, "e1": 0.875})
    assert payload["layers"][1]["slots"] == ["e0", "e1", "memory"]
    assert (tmp_path / "expert_usage" / "step0000007.png").stat().st_size > 0


def test_dominant_expert_maps_follow_the_gates() -> None:
    net = tiny().train()
    with torch.no_grad():  # task 1, layer 2: slot 2 wins everywhere
        gates = net.mmoe[2].gates
        gates.token_proj.bias.view(4, 4)[1, 2] = 100.0
    maps = dominant_expert_maps(net, images(1)[0])
    assert net.training and not net.record_gates
    assert list(maps) == ["semseg", "normals", "edge", "mouth"]
    assert all(len(per_layer) == 4 for per_layer in maps.values())
    assert maps["semseg"][0].shape == IMAGE and maps["semseg"][0].dtype == torch.int64
    assert int(maps["semseg"][0].max()) < 3 and int(maps["semseg"][1].max()) < 4
    assert (maps["normals"][2] == 2).all()


def test_summary_and_experts_commands_on_the_synthscenes_config(tmp_path: Path) -> None:
    data = ["--data.init_args.num_train=2", "--data.init_args.num_val=2", f"--data.init_args.cache_dir={tmp_path}"]
    out = tmp_path / "summary.json"
    assert summary_main(["--config", SYNTH_CONFIG, "--json", str(out), *data]) == 0
    summary = json.loads(out.read_text())
    assert summary["image_size"] == [96, 128]
    assert set(summary["groups"]) == {"backbone", "mmoe", "heads"}
    assert sum(summary["groups"].values()) == summary["total_params"]
    assert summary["flops"] > 0
    figure = tmp_path / "experts.png"
    assert experts_main(["--config", SYNTH_CONFIG, "--index", "1", "--out", str(figure), *data]) == 0
    assert figure.stat().st_size > 0


def test_experts_command_loads_weights_and_images_like_every_other_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image
    from safetensors.torch import save_file

    from polytask.training.checkpoint import CheckpointMismatchError

    data = ["--data.init_args.num_train=2", "--data.init_args.num_val=2", f"--data.init_args.cache_dir={tmp_path}"]
    figure = tmp_path / "experts.png"
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    assert experts_main(["--config", SYNTH_CONFIG, "--image", str(photo), "--out", str(figure), *data]) == 0
    assert figure.stat().st_size > 0
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    for image, reason in ((broken, "not an image PIL can read"), (tmp_path / "missing.png", "no such file")):
        with pytest.raises(SystemExit):
            experts_main(["--config", SYNTH_CONFIG, "--image", str(image), "--out", str(figure), *data])
        assert f"--image {image}: {reason}" in capsys.readouterr().err
    wrong = tmp_path / "other_model.safetensors"
    save_file({"backbone.weight": torch.zeros(2)}, str(wrong))
    with pytest.raises(CheckpointMismatchError, match="other_model.safetensors"):
        experts_main(["--config", SYNTH_CONFIG, "--ckpt_path", str(wrong), "--index", "0", "--out", str(figure), *data])



class _Attention(torch.nn.Module):
    """Pixels as tokens (L = H W), projected to width 64 (one head) and attending to themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 64, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(images.flatten(2).transpose(1, 2)).unsqueeze(1)
        return F.scaled_dot_product_attention(tokens, tokens, tokens)


def test_count_flops_includes_attention_matmuls() -> None:
    from polytask.models.summary import count_flops

    length, dim = 4 * 5, 64
    projection = 2 * length * 3 * dim
    # Q K^T and A V: (L x d) @ (d x L) and (L x L) @ (L x d), 2 L L d FLOPs each
    attention = 2 * (2 * length * length * dim)
    assert count_flops(_Attention(), (4, 5)) == projection + attention


def test_a_size_off_the_patch_grid_is_padded_and_the_outputs_cropped_back() -> None:
    torch.manual_seed(0)
    net = TaskExpert(tasks(), backbone="vit_tiny_patch16_224", backbone_options={**BACKBONE, "dynamic_img_size": True},
                     num_experts=3, width=16, head_channels=8).eval()
    patch_h, patch_w = net.backbone.patch_embed.patch_size
    height, width = IMAGE[0] + patch_h - 3, IMAGE[1] + patch_w - 5  # 3 and 5 short of the next multiples
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (0, 5, 0, 3))
    with torch.no_grad():
        out, reference = net(x), net(padded)
    for task in tasks():
        if task.dense:
            assert out[task.name].shape == (2, task.out_channels, height, width)
            torch.testing.assert_close(out[task.name], reference[task.name][..., :height, :width], rtol=0, atol=0)
        else:
            torch.testing.assert_close(out[task.name], reference[task.name], rtol=0, atol=0)
