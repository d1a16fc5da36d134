"""The polytask command end to end on a tiny SynthScenes run."""

import json
from pathlib import Path

import pytest

from polytask.cli import instantiate, main

TINY = [
    "--data.num_train", "16", "--data.num_val", "8", "--data.image_size", "[32, 48]", "--data.batch_size", "4",
    "--model.net.init_args.decoder_channels", "16", "--model.net.init_args.head_channels", "8",
    "--trainer.max_steps", "3",
]


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYTASK_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_fit_then_test_writes_metric_tables(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["fit", *TINY])
    val_files = list(workdir.glob("runs/synthscenes_hard_sharing/version_*/val_metrics.json"))
    assert len(val_files) == 1
    results = json.loads(val_files[0].read_text())["results"]
    assert set(results) == {"semseg", "depth", "normals", "edge", "sal", "human_parts"}
    assert 0.0 <= results["semseg"]["mIoU"] <= 100.0
    assert "val metrics" in capsys.readouterr().out
    ckpt = next(workdir.glob("runs/synthscenes_hard_sharing/version_*/checkpoints/last.ckpt"))
    main(["test", *TINY, "--ckpt_path", str(ckpt)])
    test_files = list(workdir.glob("runs/synthscenes_hard_sharing/version_*/test_metrics.json"))
    assert len(test_files) == 1
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
