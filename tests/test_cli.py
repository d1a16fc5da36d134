"""The polytask command end to end on a tiny SynthScenes run."""

import json
from pathlib import Path

import pytest
import torch

from conftest import HARD_SHARING_CONFIG, TINY_HARD_SHARING_CLI
from polytask.cli import main
from polytask.cli.main import TOOLS
from polytask.config import LIGHTNING_COMMANDS, instantiate, lightning_main
from polytask.training.checkpoint import CheckpointError, read_checkpoint

TINY = [
    "--config", HARD_SHARING_CONFIG,
    "--data.num_train", "16", "--data.num_val", "8", "--data.image_size", "[32, 48]", "--data.batch_size", "4",
    *TINY_HARD_SHARING_CLI, "--trainer.max_steps", "3",
]  # fmt: skip


def test_fit_then_test_writes_metric_tables(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["fit", *TINY, "--trainer.max_steps", "4"])  # one epoch of 4 batches, then its validation
    val_files = list(workdir.glob("runs/hard_sharing_synthscenes/version_*/val_metrics.json"))
    assert len(val_files) == 1
    results = json.loads(val_files[0].read_text())["results"]
    assert set(results) == {"semseg", "depth", "normals", "edge", "sal", "human_parts"}
    assert 0.0 <= results["semseg"]["mIoU"] <= 100.0
    assert "val metrics" in capsys.readouterr().out
    ckpt = next(workdir.glob("runs/hard_sharing_synthscenes/version_*/checkpoints/last.ckpt"))
    main(["test", *TINY, "--ckpt_path", str(ckpt)])
    test_files = list(workdir.glob("runs/hard_sharing_synthscenes/**/test_metrics.json"))
    assert [f.relative_to(workdir).as_posix() for f in test_files] == [
        "runs/hard_sharing_synthscenes/version_0/test-last/test_metrics.json"  # inside the run, not a new version
    ]
    assert set(json.loads(test_files[0].read_text())["results"]) == set(results)


def test_task_subset_and_loss_weight_overrides(workdir: Path) -> None:
    cli = instantiate(overrides=[*TINY, "--data.tasks", "[semseg, depth]", "--model.loss_weights", "{depth: 3.0}"])
    assert cli.model.loss_weights == {"semseg": 1.0, "depth": 3.0}
    assert set(cli.model.net.heads) == {"semseg", "depth"}


def test_unknown_task_is_refused_before_training(workdir: Path) -> None:
    with pytest.raises(ValueError, match=r"synthscenes\): unknown task\(s\) \['boundaries'\] in data.tasks"):
        main(["fit", *TINY, "--data.tasks", "[semseg, boundaries]"])
    assert not (workdir / "runs").exists()


def test_loss_weight_for_untrained_task_is_refused(workdir: Path) -> None:
    with pytest.raises(ValueError, match=r"loss_weights names task\(s\) \['sal'\] that are not trained"):
        instantiate(overrides=[*TINY, "--data.tasks", "[semseg]", "--model.loss_weights", "{sal: 2.0}"])


def test_last_checkpoint_holds_the_final_model(workdir: Path) -> None:
    """One epoch of 4 steps, a save every 3 steps: last.ckpt still holds step 4, and validating it
    gives the numbers fit reported."""
    fit = lightning_main(["fit", *TINY, "--trainer.max_steps", "4", "--trainer.callbacks.every_n_train_steps", "3"])
    run = workdir / "runs" / "hard_sharing_synthscenes" / "version_0"
    saved = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == fit.trainer.global_step == 4
    for key, value in fit.model.state_dict().items():
        torch.testing.assert_close(saved["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert not list((run / "checkpoints").glob(".*.tmp")), "written atomically, no temporary file left"
    fit_report = json.loads((run / "val_metrics.json").read_text())
    assert fit_report["step"] == 4

    main(["validate", *TINY, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    validated = json.loads((run / "validate-last" / "val_metrics.json").read_text())
    assert [p.name for p in (workdir / "runs" / "hard_sharing_synthscenes").iterdir()] == ["version_0"]
    assert (validated["epoch"], validated["step"]) == (saved["epoch"], 4)  # the weights' position, not the trainer's 0
    for task, values in fit_report["results"].items():
        for name, value in values.items():
            assert validated["results"][task][name] == pytest.approx(value, abs=1e-6), f"{task}/{name}"


def test_ckpt_path_last_without_a_checkpoint_is_an_error_unless_allowed(workdir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=(
        r"polytask fit --ckpt_path last: there is no last checkpoint to load \(ResumableCheckpoint searched "
        r"runs/hard_sharing_synthscenes/\*/checkpoints/last\*\.ckpt\).*--allow_missing_last true"
    )):
        main(["fit", *TINY, "--ckpt_path", "last"])
    assert not list(workdir.glob("runs/**/*.ckpt")), "nothing was trained"

    with pytest.warns(UserWarning, match=r"--ckpt_path last: no last checkpoint .*going on without one"):
        first = lightning_main(["fit", *TINY, "--ckpt_path", "last", "--allow_missing_last", "true"])
    assert first.trainer.global_step == 3
    resumed = lightning_main(["fit", *TINY, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    first_last = workdir / "runs" / "hard_sharing_synthscenes" / "version_0" / "checkpoints" / "last.ckpt"
    assert Path(resumed.trainer.ckpt_path).resolve() == first_last.resolve()
    assert resumed.trainer.global_step == 4


def test_fit_without_validation_reports_no_sanity_check_numbers(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["fit", *TINY])  # 3 steps of a 4-step epoch: only the sanity check validated (untrained weights)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "val metrics (" not in out
    assert "fit ran no validation (it stopped at step 3, before the first one" in out
    assert "--ckpt_path runs/hard_sharing_synthscenes/version_0/checkpoints/last.ckpt" in out
    assert not list(workdir.glob("runs/**/val_metrics.json"))


def test_top_level_help_lists_every_command_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for args in ([], ["--help"], ["-h"]):
        assert main(args) == 0
        out = capsys.readouterr().out
        assert out.startswith("polytask: ")
        listed = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
        assert set(listed) == set(LIGHTNING_COMMANDS) | set(TOOLS)
        assert all(len(line.split()) > 2 for line in listed.values())  # a summary after each name
    assert "paired multi-seed comparisons" in out


@pytest.mark.parametrize(("typo", "suggestion"), [("fitt", "fit"), ("sumary", "summary"), ("evalute", "evaluate")])
def test_a_mistyped_command_suggests_the_closest_one(typo: str, suggestion: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([typo]) == 2
    err = capsys.readouterr().err
    assert f"unknown command '{typo}'; did you mean '{suggestion}'?" in err


def test_model_summary_counts_the_networks_flops_at_the_training_resolution(workdir: Path) -> None:
    from types import SimpleNamespace

    from polytask.models.summary import count_flops
    from polytask.training.model_summary import NetFlopsRichModelSummary

    cli = instantiate([], TINY)
    summaries = [c for c in cli.trainer.callbacks if "ModelSummary" in type(c).__name__]
    assert [type(c) for c in summaries] == [NetFlopsRichModelSummary]  # in place of Lightning's, which printed 0
    trainer = SimpleNamespace(strategy=cli.trainer.strategy, datamodule=cli.datamodule)
    summary = summaries[0]._summary(trainer, cli.model)
    expected = count_flops(cli.model.net, (32, 48))
    assert expected > 0 and summary.total_flops == expected
    assert dict(zip(summary.layer_names, summary.param_nums))["net"] > 0
    assert sum(summary.flop_counts["net"].values()) == expected  # the table's per-layer column too


def test_training_resolution_takes_the_first_height_width_pair() -> None:
    from types import SimpleNamespace

    from polytask.models.summary import training_resolution

    celeba_like = SimpleNamespace(image_size=64, train_size=(32, 48))  # a short side is not a resolution
    assert training_resolution(SimpleNamespace(image_size=None), celeba_like) == (32, 48)
    assert training_resolution(SimpleNamespace(image_size=[96, 128]), celeba_like) == (96, 128)
    assert training_resolution(SimpleNamespace(), SimpleNamespace(image_size=64)) is None


def test_a_run_shares_one_folder_between_its_loggers_and_names_it_after_dataset_and_model(workdir: Path) -> None:
    fit = lightning_main(["fit", *TINY, "--trainer.max_steps", "4", "--run_name", "null"])
    run = workdir / "runs" / "synthscenes_hard_sharing" / "version_0"  # <dataset>_<model> when no run_name
    assert [Path(logger.log_dir).resolve() for logger in fit.trainer.loggers] == [run.resolve()] * 2
    assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "val_metrics.json").is_file()
    saved = (run / "config.yaml").read_text()
    assert "version: null" in saved and "version: 0" not in saved  # rerunning the saved config makes a new version
    second = lightning_main(["fit", *TINY, "--trainer.max_steps", "1", "--run_name", "null"])
    assert {Path(logger.log_dir).name for logger in second.trainer.loggers} == {"version_1"}


def test_exported_safetensors_serve_validate_and_start_fit_but_cannot_resume(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit = lightning_main(["fit", *TINY, "--trainer.max_steps", "4"])
    run = workdir / "runs" / "hard_sharing_synthscenes" / "version_0"
    assert main(["export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", "w.safetensors"]) == 0
    fit_report = json.loads((run / "val_metrics.json").read_text())

    validated = lightning_main(["validate", *TINY, "--ckpt_path", "w.safetensors"])
    report = json.loads((Path(validated.trainer.log_dir) / "val_metrics.json").read_text())
    assert Path(validated.trainer.log_dir).name == "validate-w"
    saved = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert (report["epoch"], report["step"]) == (saved["epoch"], 4)  # from the file's metadata
    assert report["results"]["semseg"] == pytest.approx(fit_report["results"]["semseg"], abs=1e-6)

    started = lightning_main(["fit", *TINY, "--trainer.max_steps", "1", "--weights", "w.safetensors",
                              "--trainer.limit_train_batches", "0"])  # fmt: skip
    for key, value in fit.model.net.state_dict().items():
        torch.testing.assert_close(started.model.net.state_dict()[key], value, msg=key)
    capsys.readouterr()
    assert main(["fit", *TINY, "--ckpt_path", "w.safetensors"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "polytask fit: error: --ckpt_path w.safetensors: a safetensors file holds network weights only" in err
    assert "with --weights w.safetensors" in err
    Path("notes.txt").write_text("not weights")
    with pytest.raises(CheckpointError, match=r"notes.txt is neither a safetensors file nor a torch checkpoint"):
        lightning_main(["validate", *TINY, "--weights", "notes.txt"])


def test_ckpt_path_last_never_loads_another_model_configs_weights(workdir: Path) -> None:
    main(["fit", *TINY])
    with pytest.raises(CheckpointError, match=r"newest last checkpoint, .*last.ckpt, was written by another model config"):
        lightning_main(["fit", *TINY, "--model.net.init_args.head_channels", "4", "--ckpt_path", "last"])
    assert [p.name for p in (workdir / "runs" / "hard_sharing_synthscenes").iterdir()] == ["version_0"]
