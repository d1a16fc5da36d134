"""The GPU check (``benchmarks/gpu_check.sh``): its CUDA tests, its summary writer and its dry run.

The tests parametrized with ``cuda`` are the test step of the GPU check (``-k cuda``); they skip
without CUDA. Their ``cpu`` twins run the same code on the CPU, so the test logic is checked on
machines without a GPU (those that start ``polytask fit`` are ``slow``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import HARD_SHARING_CONFIG, POLYTASK, REPO, subprocess_env
from polytask.data import SynthScenesDataModule
from polytask.models import HardSharing
from polytask.models.taskexpert import TaskExpert
from polytask.tasks import build_task

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check_summary  # noqa: E402

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it there)")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]
IMAGE = (32, 48)


def tiny_taskexpert(**options: object) -> TaskExpert:
    torch.manual_seed(0)
    tasks = [build_task("semseg", num_classes=5), build_task("normals"), build_task("edge")]
    backbone = {"img_size": IMAGE, "embed_dim": 32, "depth": 4, "num_heads": 2}
    return TaskExpert(tasks, backbone="vit_tiny_patch16_224", backbone_options=backbone, num_experts=3, width=16,
                      head_channels=8, **options)  # fmt: skip


def images(device: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *IMAGE, generator=torch.Generator().manual_seed(1)).to(device)


def scale(out: dict[str, torch.Tensor]) -> float:
    return max(float(o.float().abs().max()) for o in out.values())


# --- the CUDA tests (the test step of the GPU check) -----------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_training_step(device: str) -> None:
    """TaskExpert and hard sharing: a bf16-autocast forward, float32 losses, finite gradients on every trained tensor."""
    tasks = SynthScenesDataModule(tasks=["semseg", "depth", "normals", "edge"]).tasks
    torch.manual_seed(0)
    nets = [tiny_taskexpert(), HardSharing(tasks, backbone="resnet18", pretrained=False, decoder_channels=16, head_channels=8)]
    from polytask.profiling.inputs import synthetic_batch

    for net in nets:
        net = net.to(device).train()
        net_tasks = tasks if isinstance(net, HardSharing) else net.tasks
        batch = synthetic_batch(net_tasks, 2, IMAGE, torch.device(device))
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = net(batch["image"])
            loss = sum(task.loss(out[task.name], batch[task.name]) for task in net_tasks)
        assert any(o.dtype == torch.bfloat16 for o in out.values()), {k: o.dtype for k, o in out.items()}
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert all(p.grad.device.type == device for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_heads_match_contiguous_heads(device: str) -> None:
    fast, plain = tiny_taskexpert(channels_last=True), tiny_taskexpert(channels_last=False)
    plain.load_state_dict(fast.state_dict())
    fast, plain = fast.to(device).eval(), plain.to(device).eval()
    assert fast.heads["semseg"].body[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = fast(images(device)), plain(images(device))
    tolerance = 1e-5 if device == "cpu" else 2e-3  # TF32 convolutions and matmuls on GPUs
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tolerance * scale(b), rtol=tolerance)


@requires_cuda
def test_inductor_compiled_model_matches_eager_on_cuda() -> None:
    net = tiny_taskexpert().cuda().eval()
    x = images("cuda")
    with torch.no_grad():
        out = torch.compile(net, fullgraph=True)(x)
        reference = net(x)
    for k in reference:
        torch.testing.assert_close(out[k], reference[k], atol=2e-3 * scale(reference), rtol=2e-3)


def deterministic_settings() -> dict[str, object]:
    """``trainer.deterministic`` of the package defaults and of every config of configs/ that sets it."""
    default = yaml.safe_load((REPO / "src" / "polytask" / "default.yaml").read_text())["trainer"]["deterministic"]
    settings: dict[str, object] = {"default.yaml": default}
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        if isinstance(trainer, dict) and "deterministic" in trainer:
            settings[str(path.relative_to(REPO))] = trainer["deterministic"]
    return settings


@pytest.fixture()
def torch_flags(monkeypatch: pytest.MonkeyPatch):
    """Restores what a Lightning Trainer's ``deterministic`` sets: torch's deterministic mode, cuDNN benchmark, cuBLAS workspace."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark


def set_deterministic(value: object, device: str) -> None:
    """Apply ``trainer.deterministic: value`` as Lightning does when it builds a Trainer."""
    import lightning.pytorch as pl

    pl.Trainer(deterministic=value, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def bilinear_backward(device: str) -> torch.Tensor:
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    F.interpolate(x, size=(16, 20), mode="bilinear", align_corners=False).square().sum().backward()
    return x.grad


@pytest.mark.parametrize("device", DEVICES)
def test_default_and_paper_config_determinism_run_bilinear_backward(device: str, torch_flags: None) -> None:
    """Every ``deterministic`` setting polytask ships (package default, paper configs) trains bilinear upsampling."""
    settings = deterministic_settings()
    assert settings["default.yaml"] == "warn"
    for value in sorted(set(map(str, settings.values()))):
        set_deterministic({"True": True, "False": False}.get(value, value), device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")
            grad = bilinear_backward(device)
        assert torch.isfinite(grad).all(), value


@requires_cuda
def test_strict_determinism_still_fails_bilinear_backward_on_cuda(torch_flags: None) -> None:
    """Why the package default is ``warn``: ``deterministic: true`` stops at bilinear upsampling's backward on CUDA.

    If this fails, torch gained a deterministic kernel and the default could be ``true`` again."""
    set_deterministic(True, "cuda")
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
    with pytest.raises(RuntimeError, match="deterministic"):
        bilinear_backward("cuda")


FIT_MODES = {
    "bf16-mixed": ["--trainer.precision", "bf16-mixed"],
    "ddp-1-device": ["--trainer.strategy", "ddp"],
}


@pytest.mark.parametrize(
    "device,mode",
    [pytest.param("cpu", m, id=f"cpu-{m}", marks=pytest.mark.slow) for m in FIT_MODES]
    + [pytest.param("cuda", m, id=f"cuda-{m}", marks=requires_cuda) for m in FIT_MODES],
)
def test_fit_with_the_package_defaults(device: str, mode: str, tmp_path: Path) -> None:
    """``polytask fit`` of hard sharing (bilinear upsampling in its decoder) with the package's ``deterministic``
    default, in bf16-mixed, and as DDP on one device (NCCL on a GPU, gloo on the CPU)."""
    args = ["fit", "--config", HARD_SHARING_CONFIG, "--run_name", "gpu_check"]
    args += ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.devices", "1"]
    args += ["--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs"), *FIT_MODES[mode]]
    args += ["--data.init_args.num_train", "8", "--data.init_args.num_val", "4", "--data.init_args.batch_size", "4"]
    args += ["--data.init_args.image_size", "[32, 48]"]
    done = subprocess.run(
        [*POLYTASK, *args], cwd=tmp_path, env=subprocess_env(POLYTASK_CACHE=str(tmp_path / "cache")),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    (run,) = (tmp_path / "runs" / "gpu_check").glob("version_*")
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["deterministic"] == "warn"
    metrics = json.loads((run / "val_metrics.json").read_text())["results"]
    assert {"semseg", "depth"} <= set(metrics)
    if mode == "ddp-1-device":
        assert f"distributed_backend={'nccl' if device == 'cuda' else 'gloo'}" in output, output[-3000:]


# --- the summary writer ----------------------------------------------------------------------


def _bench_report(model: str, medians: dict[str, float], configs: list[str]) -> dict:
    return {
        "configs": configs, "model": model, "image_size": [64, 64], "batch_size": 1, "skipped": {},
        "summary": {"total_params": 2_500_000, "gflops": 1.5},
        "devices": [{
            "device": "cpu", "device_name": "cpu (1 threads)", "skipped": {},
            "results": [{"key": k, "median_ms": v, "samples_per_s": 1e3 / v, "peak_mem_mb": None} for k, v in medians.items()],
            "ratios": {},
        }],
    }  # fmt: skip


def test_summary_writer_reports_steps_tests_benchmarks_and_versus_ratios(tmp_path: Path) -> None:
    out = tmp_path
    (out / "logs").mkdir()
    rows = [
        ("env", "0", "2", "60", "ok", "env.json", "python env"),
        ("tests", "1", "30", "200", "failed", "tests.xml", "python -m pytest"),
        ("bench_taskexpert_vitl", "124", "150", "150", "timeout", "bench_taskexpert_vitl.json", "polytask bench"),
        ("bench_etr_nlp_vs_hard_sharing", "0", "40", "180", "ok", "bench_etr_nlp_vs_hard_sharing.json", "polytask bench --versus"),
        ("task_batching", "0", "20", "60", "ok", "task_batching.md", "python benchmarks/etr_nlp_task_batching.py"),
    ]
    (out / "steps.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    (out / "logs" / "tests.log").write_text("collected 3 items\nFAILED tests/x.py::test_b\n")
    (out / "env.json").write_text(json.dumps({"device_name": "NVIDIA H100", "torch": "2.14.1", "cuda_version": "13.0"}))
    (out / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.x" name="test_a" time="1"/>'
        '<testcase classname="tests.x" name="test_b" time="1"><failure message="boom"/></testcase>'
        '<testcase classname="tests.x" name="test_c" time="0"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    base = _bench_report("HardSharingSegNet", {"model/fp32/eager/train": 4.0, "per_task/fp32/eager/train": 6.0}, ["hs.yaml"])
    other = _bench_report("ETRNLPSegNet", {"model/fp32/eager/train": 30.0}, ["etr.yaml"])
    other["comparison"] = [{"key": "model/fp32/eager/train", "base_median_ms": 4.0, "versus_median_ms": 30.0, "ratio": 7.5}]
    other["ratios"] = {"versus_over_base/model/fp32/eager/train": 7.5}
    (out / "bench_etr_nlp_vs_hard_sharing.json").write_text(json.dumps({**base, "versus": other}))
    (out / "task_batching.md").write_text("| T | loop / stacked train |\n|---|---|\n| 3 | 1.40 |\n")

    summary = gpu_check_summary.write_summary(out, "gpu", 222.0)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [s["status"] for s in summary["steps"]] == ["ok", "failed", "timeout", "ok", "ok"]
    assert summary["tables"] == {"task_batching": "| T | loop / stacked train |\n|---|---|\n| 3 | 1.40 |\n"}
    assert "FAILED tests/x.py::test_b" in summary["steps"][1]["log_tail"] and "log_tail" not in summary["steps"][0]
    tests = summary["tests"]
    assert (tests["total"], tests["passed"], tests["failed"], tests["skipped"]) == (3, 1, 1, 1)
    assert tests["failures"] == ["tests.x::test_b"] and tests["skipped_reasons"] == {"tests.x::test_c": "needs a CUDA GPU"}
    assert summary["device"]["name"] == "NVIDIA H100"
    assert summary["benchmarks"]["bench_taskexpert_vitl"] == {"status": "timeout", "json": "bench_taskexpert_vitl.json"}
    versus = summary["benchmarks"]["bench_etr_nlp_vs_hard_sharing"]
    assert versus["model"] == "HardSharingSegNet" and versus["versus"]["model"] == "ETRNLPSegNet"
    assert versus["params_m"] == 2.5 and versus["variants"]["model/fp32/eager/train"]["samples_per_s"] == 250.0
    assert versus["versus_ratios"] == {"versus_over_base/model/fp32/eager/train": 7.5}
    markdown = (out / "summary.md").read_text()
    assert "| bench_taskexpert_vitl | timeout | 124 | 150 | 150 |" in markdown
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in markdown and "- FAILED tests.x::test_b" in markdown
    assert "| model/fp32/eager/train | 4.0 | 30.0 | 7.500 |" in markdown
    assert markdown.endswith("## task_batching\n\n| T | loop / stacked train |\n|---|---|\n| 3 | 1.40 |\n")


def test_summary_is_written_when_every_step_failed_before_writing_anything(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text("env\t1\t1\t60\tfailed\tenv.json\tpython env\ntests\t-\t0\t5\tskipped\ttests.xml\tpytest\n")
    summary = gpu_check_summary.write_summary(tmp_path, "gpu", 3.0)
    assert summary["tests"] is None and summary["benchmarks"] == {} and summary["steps"][1]["rc"] is None
    assert "no junit XML" in (tmp_path / "summary.md").read_text()


# --- the dry run -----------------------------------------------------------------------------


def _check_dry_run_summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run" and summary["wall_s"] > 0
    assert summary["device"]["torch"] == torch.__version__ and summary["device"]["name"].startswith("cpu")
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["env", "tests", "bench_taskexpert_vitl", "bench_etr_nlp_vs_hard_sharing", "task_batching"]
    assert all(s["status"] == "ok" and s["rc"] == 0 and s["wall_s"] >= 0 for s in steps.values()), steps
    tests = summary["tests"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] == tests["total"] > 0
    assert all("CUDA" in reason for reason in tests["skipped_reasons"].values())

    vitl = summary["benchmarks"]["bench_taskexpert_vitl"]
    assert vitl["model"] == "TaskExpert" and vitl["image_size"] == [64, 64] and vitl["batch_size"] == 1
    assert vitl["params_m"] > 300
    for key in ("model/fp32/eager/train", "model/bf16/eager/train", "model/fp32/eager/infer", "bare/fp32/eager/train"):
        assert vitl["variants"][key]["median_ms"] > 0 and vitl["variants"][key]["peak_mem_mb"] >= 0, key
    assert {"model_over_bare/fp32/eager/train", "bf16_over_fp32/model/eager/train"} <= set(vitl["ratios"])

    etr = summary["benchmarks"]["bench_etr_nlp_vs_hard_sharing"]
    assert etr["model"] == "RoutedSegNet[hard_sharing]" and etr["versus"]["model"] == "RoutedSegNet[etr_nlp]"
    assert etr["image_size"] == etr["versus"]["image_size"] == [64, 64]
    assert {row["key"] for row in etr["comparison"]} >= {"model/fp32/eager/train", "model/bf16/eager/infer"}
    for row in etr["comparison"]:
        base = etr["variants"][row["key"]]["median_ms"]
        other = etr["versus"]["variants"][row["key"]]["median_ms"]
        assert row["base_median_ms"] == base and row["versus_median_ms"] == other
        assert row["ratio"] == pytest.approx(other / base, rel=1e-12)
        assert etr["versus_ratios"][f"versus_over_base/{row['key']}"] == row["ratio"]
    assert "| 3 | 1x32x32 | 24,576 |" in summary["tables"]["task_batching"]
    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("# GPU check (dry-run)") and "| bench_etr_nlp_vs_hard_sharing | ok | 0 |" in markdown
    return summary


@pytest.mark.slow
def test_dry_run_writes_the_summary(tmp_path: Path) -> None:
    """``bash benchmarks/gpu_check.sh --dry-run OUT``: every step on the CPU at tiny sizes, then the summary."""
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("summary.json", "summary.md", "steps.tsv", "env.json", "tests.xml"):
        assert (out / name).is_file(), name
    _check_dry_run_summary(out)


def test_script_refuses_a_missing_out_dir() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr
