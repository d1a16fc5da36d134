"""DDP on 2 CPU processes (gloo) trains exactly like one process holding the whole batch.

Both runs are ``polytask fit`` of one config: in this process with batch 4, and with
``configs/trainer/ddp_cpu.yaml`` as 2 processes of batch 2 (Lightning starts the second
process). After one epoch (4 Adam steps) the validation metrics agree to 1e-5 relative and every
weight and buffer to 1e-5. What makes them equal:

* the same images in every step: the datamodule's training sampler shards one permutation of
  ``(seed, epoch)`` by rank (rank ``r`` takes positions ``r, r + 2, ...``), so the two ranks of
  a step hold the four images of the one-process step; no flip augmentation;
* batch statistics over the 4 images: :class:`GlooSyncBatchNorm` below, since torch's
  ``SyncBatchNorm`` runs on GPUs only (DDP refuses it on CPU modules);
* losses that are means over equal counts, so DDP's average of the per-process gradients is
  the gradient of the whole batch: semseg (no ignored pixels in SynthScenes), depth (every
  pixel valid), normals and edge. Saliency is left out (its class weights are balanced per
  batch) and so are human parts (255 on whole images without a box: unequal valid counts);
* metrics as sums synced by torchmetrics at ``compute()`` over validation splits that divide
  evenly between the ranks (no padding duplicates);
* float64 (``precision: 64-true``): the two runs sum in different orders, and in float32 the
  rounding differences grow through the steps of the untrained network. Measured with this test
  in float32: metrics within 9e-9 relative, weights within 5.3e-5 (Adam, lr 1e-3; with SGD,
  lr 0.05: 2.3e-5). In float64 both agree to 1.4e-13.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import nn

REPO = Path(__file__).resolve().parents[1]
TASKS = ["semseg", "depth", "normals", "edge"]
IMAGE_SIZE = (32, 48)
NUM_TRAIN, NUM_VAL, TOTAL_BATCH = 16, 8, 4


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes; the gradient is summed over the processes too."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d normalising with the statistics of the batch of all processes (works on CPU/gloo).

    Mean and variance come from differentiable all-reduces of per-channel sums (two passes:
    the sums, then the squared deviations), so gradients flow through the global statistics as
    in torch's ``SyncBatchNorm``. Outside training or distributed runs it is a plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        count = _AllReduceSum.apply(x.new_tensor([x.numel() / channels]))
        mean = _AllReduceSum.apply(x.sum(dim=(0, 2, 3))) / count
        centred = x - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centred.pow(2).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * count / (count - 1), self.momentum)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y


def _swap_batchnorms(module: nn.Module, target: type[nn.BatchNorm2d]) -> nn.Module:
    """Replace every BatchNorm2d (exact type) of ``module`` by ``target``, keeping parameters and buffers."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm2d, GlooSyncBatchNorm) and type(child) is not target:
            swapped = target(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            swapped.load_state_dict(child.state_dict())
            setattr(module, name, swapped)
        else:
            _swap_batchnorms(child, target)
    return module


class GlooBatchNormSync(LayerSync):
    """Lightning ``LayerSync`` plugin turning BatchNorm2d layers into :class:`GlooSyncBatchNorm`."""

    def apply(self, model: nn.Module) -> nn.Module:
        return _swap_batchnorms(model, GlooSyncBatchNorm)

    def revert(self, model: nn.Module) -> nn.Module:
        return _swap_batchnorms(model, nn.BatchNorm2d)


def _write_config(path: Path, out_dir: Path, cache_dir: Path, batch_size: int) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1,
            "deterministic": True,
            "precision": "64-true",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "plugins": [{"class_path": "test_ddp.GlooBatchNormSync"}],
            "callbacks": [
                {"class_path": "polytask.training.MetricReport", "init_args": {"json_dir": str(out_dir)}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(out_dir), "save_last": True, "save_top_k": 0},
                },
            ],
        },
        "model": {
            "net": {
                "class_path": "polytask.models.HardSharing",
                "init_args": {"backbone": "resnet18", "decoder_channels": 16, "head_channels": 8},
            },
        },
        "data": {
            "class_path": "polytask.data.SynthScenesDataModule",
            "init_args": {
                "tasks": TASKS,
                "num_train": NUM_TRAIN,
                "num_val": NUM_VAL,
                "image_size": list(IMAGE_SIZE),
                "flip": False,
                "cache_dir": str(cache_dir),
                "batch_size": batch_size,
            },
        },
    }
    path.write_text(json.dumps(config))


def _results(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validation results and final state dict written by a run into ``out_dir``."""
    results = json.loads((out_dir / "val_metrics.json").read_text())["results"]
    state = torch.load(out_dir / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return results, state


def _fit_one_process(tmp_path: Path, cache_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``polytask fit`` in this process with the whole batch."""
    from polytask.cli import main

    config = tmp_path / "config1.yaml"
    _write_config(config, tmp_path / "run1", cache_dir, TOTAL_BATCH)
    main(["fit", "--config", str(config)])
    return _results(tmp_path / "run1")


def _fit_ddp(tmp_path: Path, cache_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``polytask fit`` with ``configs/trainer/ddp_cpu.yaml``: Lightning starts the second process."""
    config = tmp_path / "config2.yaml"
    _write_config(config, tmp_path / "run2", cache_dir, TOTAL_BATCH // 2)
    polytask = Path(sys.executable).with_name("polytask")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, str(polytask), "fit",
        "--config", str(config), "--config", str(REPO / "configs" / "trainer" / "ddp_cpu.yaml"),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return _results(tmp_path / "run2")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SynthScenes splits rendered once, before the processes start."""
    from polytask.data.synthscenes import SynthScenes

    cache = tmp_path_factory.mktemp("cache")
    for split, size in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        SynthScenes(split, size, IMAGE_SIZE, tasks=TASKS, cache_dir=cache).prepare()
    return cache


def test_gloo_sync_batchnorm_is_batchnorm_outside_distributed_runs() -> None:
    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 6)
    swapped = GlooBatchNormSync().apply(nn.Sequential(bn))[0]
    assert type(swapped) is GlooSyncBatchNorm
    torch.testing.assert_close(swapped(x), nn.BatchNorm2d(3)(x))
    assert type(GlooBatchNormSync().revert(nn.Sequential(swapped))[0]) is nn.BatchNorm2d


def test_two_processes_of_batch_2_equal_one_process_of_batch_4(tmp_path: Path, cache_dir: Path) -> None:
    single_results, single_state = _fit_one_process(tmp_path, cache_dir)
    ddp_results, ddp_state = _fit_ddp(tmp_path, cache_dir)

    assert set(single_results) == set(TASKS) == set(ddp_results)
    for task, metrics in single_results.items():
        for name, value in metrics.items():
            assert ddp_results[task][name] == pytest.approx(value, rel=1e-5, abs=1e-5), (task, name)

    assert single_state.keys() == ddp_state.keys()
    for key, value in single_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=0.0, atol=1e-5, msg=key)
    initial = _initial_state(tmp_path / "config1.yaml")
    moved = max(float((v - initial[k]).abs().max()) for k, v in single_state.items() if v.is_floating_point())
    assert moved > 1e-3, "training did not change the weights: the comparison would be vacuous"


def _initial_state(config: Path) -> dict[str, torch.Tensor]:
    """The state dict a run of ``config`` starts from (built by the same CLI, seed included)."""
    from polytask.cli import instantiate

    return {k: v.clone() for k, v in instantiate([str(config)]).model.state_dict().items()}
