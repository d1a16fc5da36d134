"""``polytask bench``: a smoke run on every config in configs/, and the pieces it is made of."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, POLYTASK, subprocess_env, tiny_net_options, tiny_synthscenes
from fixtures_data import write_celeba, write_folder
from polytask.cli.bench import main as bench_main
from polytask.data import SynthScenesDataModule
from polytask.models import HardSharing, SingleTask
from polytask.models.summary import summarize_model
from polytask.profiling.bare import BareNet, make_bare_net
from polytask.profiling.experiment import Experiment, benchmark_configs, config_chain, load_experiment
from polytask.profiling.inputs import fit_batch, synthetic_batch
from polytask.profiling.loader import measure_loader
from polytask.profiling.memory import peak_memory_mb
from polytask.profiling.run import interleave_sides, versus_comparison
from polytask.profiling.timing import Result, Variant, ratios, time_interleaved

CONFIG_FILES = benchmark_configs(CONFIGS)
FIXTURE_WRITERS = {"CelebADataModule": write_celeba, "FolderDataModule": write_folder}
"""Datamodules that need their files even to tell their tasks: benchmarked on a fixture tree."""
FALLBACK_SIZE = (64, 64)
"""Resolution of the meta-device FLOP count for configs whose resolution comes from their absent files."""


def _config_id(config: Path) -> str:
    return str(config.relative_to(CONFIGS))


def _data_class(chain: list[Path]) -> str | None:
    """Class name of the datamodule the last config of ``chain`` that names one sets."""
    names = [(yaml.safe_load(c.read_text()) or {}).get("data", {}).get("class_path") for c in chain]
    named = [n for n in names if n]
    return named[-1].rpartition(".")[2] if named else None


def _bench_setup(config: Path, workdir: Path) -> tuple[list[str], list[str]]:
    """The ``--config`` arguments of ``config`` (its chain) and its overrides: SGD (no optimizer
    state: Adam's would add 2 x 4 bytes x 332 M parameters = 2.7 GB for the ViT-L configs) and, for
    datamodules that need their files, the root of a fixture tree written into ``workdir``."""
    chain = config_chain(config)
    overrides = ["--model.optimizer", "torch.optim.SGD"]
    writer = FIXTURE_WRITERS.get(_data_class(chain) or "")
    if writer is not None:
        writer(workdir / "fixture")
        overrides += ["--data.init_args.root", str(workdir / "fixture")]
    return [a for c in chain for a in ("--config", str(c))], overrides


def _full_size_on_meta(configs: list[str], overrides: list[str]) -> Experiment:
    """The config's datamodule and module built as ``polytask bench`` builds them, at the config's own
    sizes and resolution, with the network's tensors on the meta device (no memory, no initialisation).

    A network whose construction reads tensor values (Task Routing's random channel masks) cannot be
    built on the meta device: it is built on the CPU and moved there.
    """
    try:
        with torch.device("meta"):
            return load_experiment(configs, overrides)
    except Exception as err:  # only the meta device's refusal of data-dependent ops is retried
        if "meta" not in str(err):
            raise
    experiment = load_experiment(configs, overrides)
    experiment.module.to("meta")
    return experiment


def _run_bench(args: list[str], overrides: list[str], out: Path) -> dict:
    """``polytask bench`` of one config at 64x64, batch 2, one step of every variant; its JSON report, checked."""
    # 64x64: stride-32 ResNets keep 2x2 maps, as BatchNorm without running statistics (the ETR-NLP
    # CelebA nets) needs more than one value per channel in the FLOP count's batch of one image.
    args = [*args, "--image-size", "64", "64", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--loader-batches", "1"]
    args += ["--threads", "1", "--no-memory"]  # 1 thread: steadier than 2 on a busy 2-core runner
    assert bench_main([*args, "--json", str(out), "--", *overrides]) == 0

    report = json.loads(out.read_text())
    assert report["image_size"] == [64, 64] and report["batch_size"] == 2
    assert report["summary"]["total_params"] > 0 and report["summary"]["flops"] > 0
    assert report["loader"] is not None or "loader" in report["skipped"]
    if report["loader"] is not None:
        assert report["loader"]["samples_per_s"] > 0
    (device,) = report["devices"]
    keys = {r["key"] for r in device["results"]}
    assert {"model/fp32/eager/train", "model/fp32/eager/infer"} <= keys
    assert ("bare/fp32/eager/train" in keys) != ("bare" in device["skipped"])
    assert ("per_task/fp32/eager/infer" in keys) != ("per_task" in device["skipped"])
    for row in device["results"]:
        assert row["median_ms"] > 0 and row["samples_per_s"] > 0 and row["peak_mem_mb"] is None, row
    assert isinstance(device["unused_parameters"], list)
    assert all(v > 0 for v in device["ratios"].values())
    return report


def test_configs_are_discovered() -> None:
    names = {_config_id(c) for c in CONFIG_FILES}
    assert "taskexpert_synthscenes.yaml" in names
    assert not any(n.startswith("trainer/") for n in names)


@pytest.mark.parametrize("config", CONFIG_FILES, ids=_config_id)
def test_every_config_builds_at_full_size_and_benches_with_a_tiny_network(config: Path, workdir: Path) -> None:
    """Every config of configs/, in two parts.

    Full size, on the meta device: the config resolved as ``polytask bench`` resolves it, its
    datamodule, module and network built with the config's own sizes, parameters counted and the
    FLOPs of one forward at the config's resolution (every layer's shapes at full size), and the bare
    network. Then ``polytask bench`` end to end (loader batch, FLOPs, bare network, per-task mode,
    a training step and inference of every variant, unused parameters, the report) on the same
    config with its network shrunk to a tiny one of the same class (``conftest.tiny_net_options``).
    Full-size training steps: ``test_bench_runs_on_every_config_at_full_size`` (slow).
    """
    configs, overrides = _bench_setup(config, workdir)
    chain = [c for c in configs if c != "--config"]
    experiment = _full_size_on_meta(chain, overrides)
    module, net = experiment.module, experiment.module.net
    assert all(t.is_meta for t in module.state_dict().values())
    size = experiment.image_size or FALLBACK_SIZE
    summary = summarize_model(net, size)
    assert summary.total_params > 0 and summary.flops > 0
    bare, reason = make_bare_net(net, module.tasks, size)
    assert reason if bare is None else summarize_model(bare, size).flops > 0

    described = json.loads(module.config_json)["net"]
    tiny = tiny_net_options(described["class"], described.get("init_args"))
    (workdir / "tiny.yaml").write_text(json.dumps({"model": {"init_args": {"net": {"init_args": tiny}}}}))
    report = _run_bench([*configs, "--config", str(workdir / "tiny.yaml")], overrides, workdir / "bench.json")
    assert report["model"] == net.display_name and report["tasks"] == [t.name for t in module.tasks]
    assert report["summary"]["total_params"] <= summary.total_params


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIG_FILES, ids=_config_id)
def test_bench_runs_on_every_config_at_full_size(config: Path, workdir: Path) -> None:
    """``polytask bench`` of every config with its full-size network at 64x64 (the ViT-L configs:
    332 M parameters). The default run covers the same code path with a tiny network and builds the
    full-size one on the meta device: ``test_every_config_builds_at_full_size_and_benches_with_a_tiny_network``."""
    configs, overrides = _bench_setup(config, workdir)
    _run_bench(configs, overrides, workdir / "bench.json")


def test_loader_measurement_ends_the_persistent_workers_it_started(tmp_path: Path) -> None:
    """Left to the garbage collector, each worker costs 5 s of waiting whenever it runs (tests after it stalled)."""
    import multiprocessing

    datamodule = tiny_synthscenes(["depth"], tmp_path, num_train=4, batch_size=2, image_size=(16, 16), num_workers=2)
    before = set(multiprocessing.active_children())
    stats, batch = measure_loader(datamodule, 1)
    assert stats.num_workers == 2 and batch["image"].shape == (2, 3, 16, 16)
    assert set(multiprocessing.active_children()) <= before


def test_bench_reports_both_precisions_and_their_ratios(workdir: Path) -> None:
    out = workdir / "bench.json"
    config = CONFIGS / "hard_sharing_digits.yaml"
    args = ["--config", str(config), "--batch-size", "2", "--steps", "2", "--warmup", "1", "--modes", "fp32,bf16", "--threads", "1"]
    assert bench_main([*args, "--loader-batches", "2", "--json", str(out)]) == 0
    device = json.loads(out.read_text())["devices"][0]
    assert all(row["peak_mem_mb"] >= 0 for row in device["results"])
    assert {"bf16_over_fp32/model/eager/train", "bf16_over_fp32/model/eager/infer"} <= set(device["ratios"])
    assert {"per_task_over_batched/fp32/eager/infer", "loader_over_train_samples_per_s"} <= set(device["ratios"])


def test_bench_without_dataset_files_skips_the_loader_and_times_random_input(workdir: Path) -> None:
    out = workdir / "bench.json"
    args = ["--config", str(CONFIGS / "data" / "nyud.yaml"), "--image-size", "32", "48", "--batch-size", "1"]
    assert bench_main([*args, "--steps", "1", "--warmup", "1", "--no-bare", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["loader"] is None and "NYUD" in report["skipped"]["loader"]
    assert report["inputs"] == "random" and report["tasks"] == ["semseg", "depth", "normals", "edge"]


def test_bench_gives_up_clearly_when_the_tasks_need_the_files(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = workdir / "bench.json"
    assert bench_main(["--config", str(CONFIGS / "data" / "celeba.yaml"), "--json", str(out)]) == 2
    assert "skipped" in capsys.readouterr().out
    assert "data.init_args.root" in json.loads(out.read_text())["skipped"]["bench"]


@pytest.mark.slow
def test_bench_compiles(workdir: Path) -> None:
    out = workdir / "bench.json"
    config = CONFIGS / "hard_sharing_digits.yaml"
    args = ["--config", str(config), "--batch-size", "2", "--steps", "1", "--warmup", "2", "--compile", "--no-bare", "--threads", "1"]
    assert bench_main([*args, "--json", str(out)]) == 0
    device = json.loads(out.read_text())["devices"][0]
    assert "compiled_over_eager/model/fp32/train" in device["ratios"], device["skipped"]


def test_layered_configs_are_benchmarked_on_their_base() -> None:
    layered = [c for c in CONFIG_FILES if len(config_chain(c)) > 1]
    for config in layered:
        assert config_chain(config)[-1] == config.resolve()


def test_bare_net_is_the_backbone_with_conv1x1_heads() -> None:
    tasks = SynthScenesDataModule(tasks=["semseg", "depth"]).tasks
    net = HardSharing(tasks, backbone="resnet18")
    bare, reason = make_bare_net(net, tasks, (32, 48))
    assert reason is None and isinstance(bare, BareNet)
    assert bare.backbone is net.backbone
    out = bare(torch.zeros(2, 3, 32, 48))
    assert out["semseg"].shape == (2, 6, 32, 48) and out["depth"].shape == (2, 1, 32, 48)
    assert sum(p.numel() for p in bare.heads.parameters()) == 512 * 7 + 7


def test_bare_net_is_skipped_with_a_reason_without_a_backbone() -> None:
    tasks = SynthScenesDataModule(tasks=["depth"]).tasks
    separate = SingleTask(tasks, backbone="resnet18", pretrained=False, decoder_channels=8, head_channels=4)
    bare, reason = make_bare_net(separate, tasks, (8, 8))
    assert bare is None and "SingleTask has no shared backbone" in str(reason)


def test_fit_batch_resizes_images_bilinearly_and_labels_by_nearest_neighbour() -> None:
    tasks = SynthScenesDataModule(tasks=["semseg", "normals"]).tasks
    batch = synthetic_batch(tasks, 3, (8, 12), torch.device("cpu"))
    batch["semseg"][:, :2] = 255
    fitted = fit_batch(batch, 5, (4, 6))
    assert fitted["image"].shape == (5, 3, 4, 6) and fitted["normals"].shape == (5, 3, 4, 6)
    assert fitted["semseg"].shape == (5, 4, 6) and fitted["semseg"].dtype == torch.int64
    assert set(fitted["semseg"].unique().tolist()) <= set(batch["semseg"].unique().tolist())
    torch.testing.assert_close(fitted["semseg"][3], fitted["semseg"][0])


def test_ratios_are_those_of_medians() -> None:
    def result(net: str, precision: str, times: list[float]) -> Result:
        return Result(net, precision, False, "train", times, batch_size=4)

    results = [result("model", "fp32", [3.0, 1.0, 2.0]), result("bare", "fp32", [1.0]), result("model", "bf16", [1.0, 1.0])]
    assert ratios(results) == {"model_over_bare/fp32/eager/train": 2.0, "bf16_over_fp32/model/eager/train": 0.5}
    assert results[0].samples_per_s == 2.0


def test_interleaved_timing_reports_variants_that_fail() -> None:
    calls: list[str] = []

    def failing() -> None:
        raise RuntimeError("no compiler")

    ok = Variant("model", "fp32", False, "infer", lambda: None, lambda: calls.append("ok"))
    bad = Variant("model", "fp32", True, "infer", lambda: None, failing)
    times, failed = time_interleaved([ok, bad], warmup=1, repeats=3, device=torch.device("cpu"))
    assert len(times[ok.key]) == 3 and calls == ["ok"] * 4
    assert failed == {bad.key: "RuntimeError: no compiler"}


def test_peak_memory_on_cpu_sees_a_temporary_allocation() -> None:
    def run() -> None:
        x = torch.ones(10 * 2**20 // 4)  # 10 MiB
        (x * 2).sum()

    assert 19.0 <= peak_memory_mb(run, torch.device("cpu")) < 40.0


def test_interleaved_timing_without_warmup_drops_a_variant_that_fails() -> None:
    def failing() -> None:
        raise RuntimeError("boom")

    ok = Variant("model", "fp32", False, "train", lambda: None, lambda: None)
    bad = Variant("bare", "fp32", False, "train", lambda: None, failing)
    times, failed = time_interleaved([ok, bad], warmup=0, repeats=2, device=torch.device("cpu"))
    assert list(times) == [ok.key] and len(times[ok.key]) == 2 and failed == {bad.key: "RuntimeError: boom"}


def test_bench_profile_on_cpu_prints_no_gpu_probing_errors(workdir: Path) -> None:
    """The profiler's library logs "gpuGetDeviceCount failed" on CPU-only machines unless bench quiets it."""
    config = CONFIGS / "hard_sharing_synthscenes_etr.yaml"
    args = ["--config", str(config), "--steps", "1", "--warmup", "0", "--modes", "fp32", "--threads", "1",
            "--device", "cpu", "--loader-batches", "0", "--no-bare", "--no-memory", "--profile", "2"]  # fmt: skip
    env = {k: v for k, v in subprocess_env().items() if k != "KINETO_LOG_LEVEL"}
    done = subprocess.run([*POLYTASK, "bench", *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "aten::" in done.stdout  # the profile ran
    assert "gpuGetDeviceCount" not in done.stderr + done.stdout


def test_versus_times_two_configs_in_one_interleaved_run(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polytask.profiling import run as bench

    calls: list[str] = []
    timed = bench.time_interleaved

    def recording(variants: list[Variant], warmup: int, repeats: int, device: torch.device) -> object:
        def record(variant: Variant) -> Variant:
            return dataclasses.replace(variant, run=lambda: (calls.append(variant.key), variant.run())[-1])

        return timed([record(v) for v in variants], warmup, repeats, device)

    monkeypatch.setattr(bench, "time_interleaved", recording)
    out = workdir / "versus.json"
    args = ["--config", str(CONFIGS / "hard_sharing_synthscenes.yaml"), "--versus", str(CONFIGS / "etr_nlp_synthscenes.yaml")]
    args += ["--image-size", "32", "32", "--batch-size", "2", "--steps", "2", "--warmup", "0", "--threads", "1"]
    assert bench_main([*args, "--no-memory", "--no-bare", "--loader-batches", "0", "--json", str(out)]) == 0

    report = json.loads(out.read_text())
    versus = report["versus"]
    assert report["model"] == "HardSharing" and versus["model"] == "RoutedSegNet[etr_nlp]"
    assert versus["configs"] == [str(CONFIGS / "etr_nlp_synthscenes.yaml")]
    assert versus["image_size"] == report["image_size"] == [32, 32] and versus["batch_size"] == report["batch_size"] == 2
    base = {r["key"]: r for r in report["devices"][0]["results"]}
    other = {r["key"]: r for r in versus["devices"][0]["results"]}
    common = sorted(set(base) & set(other))
    assert common == ["model/fp32/eager/infer", "model/fp32/eager/train"] and "per_task/fp32/eager/train" in other
    assert sorted(versus["ratios"]) == [f"versus_over_base/{k}" for k in common]
    for key in common:
        assert len(base[key]["times_ms"]) == len(other[key]["times_ms"]) == 2
        assert versus["ratios"][f"versus_over_base/{key}"] == pytest.approx(other[key]["median_ms"] / base[key]["median_ms"], rel=1e-12)
    assert [row["key"] for row in versus["comparison"]] == [k for k in base if k in other]
    # one timed call per variant per round; within a round the common variants' calls alternate between the sides
    rounds = [calls[:6], calls[6:]]
    assert len(calls) == 12 and all(sorted(r) == sorted(calls[:6]) for r in rounds)
    for round_ in rounds:
        sides = [key.partition(":")[0] for key in round_ if key.partition(":")[2] in common]
        assert sides in (["base", "versus"] * 2, ["versus", "base"] * 2), round_


def test_interleave_sides_pairs_the_common_variants() -> None:
    def variants(*nets: str) -> list[Variant]:
        return [Variant(n, "fp32", False, phase, lambda: None, lambda: None) for n in nets for phase in ("train", "infer")]

    order = [v.key for v in interleave_sides(variants("model", "bare"), variants("model", "per_task"))]
    assert order == [
        "base:model/fp32/eager/train", "versus:model/fp32/eager/train", "base:model/fp32/eager/infer",
        "versus:model/fp32/eager/infer", "base:bare/fp32/eager/train", "base:bare/fp32/eager/infer",
        "versus:per_task/fp32/eager/train", "versus:per_task/fp32/eager/infer",
    ]


def test_versus_comparison_is_versus_over_base_for_common_variants() -> None:
    base = [{"key": "model/fp32/eager/train", "median_ms": 4.0}, {"key": "bare/fp32/eager/train", "median_ms": 1.0}]
    other = [{"key": "model/fp32/eager/train", "median_ms": 10.0}, {"key": "per_task/fp32/eager/train", "median_ms": 3.0}]
    assert versus_comparison(base, other) == [
        {"key": "model/fp32/eager/train", "base_median_ms": 4.0, "versus_median_ms": 10.0, "ratio": 2.5}
    ]


def test_versus_refuses_several_devices() -> None:
    with pytest.raises(SystemExit, match="one --device"):
        bench_main(["--versus", "x.yaml", "--device", "cpu", "--device", "cpu"])


def test_the_timed_training_step_uses_the_configured_weighting_strategy() -> None:
    from conftest import tiny_hard_sharing
    from polytask.profiling.variants import build_variants
    from polytask.tasks import build_task
    from polytask.training import MultiTaskModule
    from polytask.weighting import FAMO

    tasks = [build_task("semseg", num_classes=3), build_task("depth")]
    module = MultiTaskModule(net=tiny_hard_sharing(), tasks=tasks, weighting=FAMO())
    batch = {"image": torch.randn(2, 3, 32, 32), "semseg": torch.randint(0, 3, (2, 32, 32)), "depth": torch.rand(2, 1, 32, 32) + 0.5}
    (train,) = [v for v in build_variants({"model": module.net}, module, batch, ["fp32"], False, torch.device("cpu")) if v.phase == "train"]
    for _ in range(3):
        train.prepare()
        train.run()
    assert int(module.weighting.adam_steps) == 2  # FAMO weighted and updated at every timed step
    assert set(module.weighting.last_weights) == {"semseg", "depth"}


def test_the_timed_training_step_lets_a_gradient_aggregator_compute_the_gradients() -> None:
    from conftest import tiny_hard_sharing
    from polytask.profiling.bare import make_bare_net
    from polytask.profiling.variants import build_variants
    from polytask.tasks import build_task
    from polytask.training import MultiTaskModule
    from polytask.weighting import GradientAggregation

    tasks = [build_task("semseg", num_classes=3), build_task("depth")]
    module = MultiTaskModule(net=tiny_hard_sharing(), tasks=tasks, weighting=GradientAggregation("pcgrad"))
    batch = {"image": torch.randn(2, 3, 32, 32), "semseg": torch.randint(0, 3, (2, 32, 32)), "depth": torch.rand(2, 1, 32, 32) + 0.5}
    bare, reason = make_bare_net(module.net, tasks, (32, 32))
    assert bare is not None, reason
    nets = {"model": module.net, "bare": bare}
    variants = {v.net: v for v in build_variants(nets, module, batch, ["fp32"], False, torch.device("cpu")) if v.phase == "train"}
    variants["model"].prepare()
    variants["model"].run()
    assert set(module.weighting.last_weights) == {"semseg", "depth"}  # PCGrad's weights: the aggregator ran
    assert module.weighting._shared[0] is module.net.shared_parameters()[0]  # the bare net's step has its own copy
