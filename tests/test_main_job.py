"""The main job (``polytask fit`` with no config) and what every command gets by default."""

from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS
from polytask.config import DEFAULT_CONFIG, MAIN_JOB_CONFIG, default_configs, instantiate, lightning_main
from polytask.models.taskexpert import TaskExpert
from polytask.training import MetricReport, PredictionWriter, ValidationImages
from polytask.training.standard_callbacks import add_standard_callbacks

# the main job's network at a tiny size: 2 blocks, MMoE after both
TINY_MAIN_JOB = [
    "--data.num_train", "16", "--data.num_val", "8", "--data.image_size", "[32, 48]", "--data.batch_size", "4",
    "--model.net.init_args.backbone_options", "{img_size: [32, 48], patch_size: 8, depth: 2, dynamic_img_size: true}",
    "--model.net.init_args.mmoe_blocks", "[1, 2]", "--model.net.init_args.width", "16",
    "--model.net.init_args.head_channels", "8", "--trainer.max_steps", "4",
]  # fmt: skip


def test_the_main_job_is_taskexpert_on_synthscenes_and_other_networks_are_one_config_away(workdir: Path) -> None:
    main_job = yaml.safe_load(Path(MAIN_JOB_CONFIG).read_text())
    assert main_job["model"]["init_args"]["net"]["class_path"].endswith("TaskExpert")
    assert "net" not in yaml.safe_load(Path(DEFAULT_CONFIG).read_text())["model"]["init_args"]
    assert default_configs([]) == [DEFAULT_CONFIG, MAIN_JOB_CONFIG]
    assert default_configs(["--config", str(CONFIGS / "data" / "folder.yaml")]) == [DEFAULT_CONFIG, MAIN_JOB_CONFIG]
    assert default_configs(["--config", str(CONFIGS / "hard_sharing_synthscenes.yaml")]) == [DEFAULT_CONFIG]
    assert default_configs(["--model.net", "polytask.models.HardSharing"]) == [DEFAULT_CONFIG]
    cli = instantiate()
    assert isinstance(cli.model.net, TaskExpert)
    assert cli.model.net.mmoe_blocks == [2, 4, 6] and type(cli.datamodule).__name__ == "SynthScenesDataModule"
    # a config naming another network gets none of the main job's network options (they would leak
    # into any network that shares an option name, e.g. backbone_options)
    hard = instantiate([str(CONFIGS / "hard_sharing_synthscenes.yaml")])
    assert type(hard.model.net).__name__ == "HardSharing"
    assert hard.model.config_json.count("patch_size") == 0


def test_the_main_job_prints_its_table_and_expert_usage_and_writes_the_picture(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fit = lightning_main(["fit", *TINY_MAIN_JOB])
    run = workdir / "runs" / "synthscenes_taskexpert" / "version_0"
    assert Path(fit.trainer.log_dir).resolve() == run.resolve()
    out = " ".join(capsys.readouterr().out.split())
    assert "val metrics (epoch 0, step 4)" in out
    assert "expert usage (validation, step 4)" in out and "block 1" in out and "block 2" in out
    picture = run / "expert_usage" / "step0000004.png"
    assert f"expert-usage picture: {picture.relative_to(workdir)}" in out and picture.is_file()
    kinds = {type(c) for c in fit.trainer.callbacks}
    assert {MetricReport, ValidationImages} <= kinds
    assert (run / "hparams.yaml").is_file()
    params = yaml.safe_load((run / "hparams.yaml").read_text())
    assert params["model.net.class_path"].endswith("TaskExpert") and params["data.batch_size"] == 4


def test_predict_writes_files_and_pictures_into_the_runs_folder_by_default(
    workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lightning_main(["fit", *TINY_MAIN_JOB])
    predict = lightning_main(["predict", *TINY_MAIN_JOB, "--ckpt_path", "last"])
    out_dir = workdir / "runs" / "synthscenes_taskexpert" / "version_0" / "predict-last" / "predictions"
    writers = [c for c in predict.trainer.callbacks if isinstance(c, PredictionWriter)]
    assert [w.out_dir.resolve() for w in writers] == [out_dir.resolve()]
    pictures = sorted((out_dir / "pictures").glob("*.png"))
    assert len(pictures) == 8  # SynthScenes' predict split is its validation split (8 scenes here)
    assert len(list((out_dir / "semseg").glob("*.png"))) == 8
    assert f"written to {writers[0].out_dir}; pictures (input and predictions side by side)" in caplog.text


def test_standard_callbacks_are_added_once_and_a_listed_one_keeps_its_options() -> None:
    trainer = {"callbacks": [{"class_path": "polytask.training.ValidationImages", "init_args": {"num_images": 8}}],
               "logger": False}
    added = add_standard_callbacks(trainer)
    assert added == ["polytask.training.MetricReport", "polytask.diagnostics.ExpertUsageMonitor"]  # no logger: no LR monitor
    assert trainer["callbacks"][0]["init_args"] == {"num_images": 8}
    assert add_standard_callbacks(trainer) == []
