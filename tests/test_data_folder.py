"""Folder datasets: polytask.yaml, per-task folders, decodings and custom task names."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fixtures_data import Fixture, write_folder
from polytask.config import lightning_main
from polytask.data.datasets.folder import FolderDataModule
from polytask.data.io import DataFileError
from polytask.data.predict import ImageFolder
from polytask.tasks import DepthTask, EdgeTask, NormalsTask, SegmentationTask

pytestmark = pytest.mark.usefixtures("fresh_cache")  # checks cached by one test never answer another


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return write_folder(tmp_path_factory.mktemp("folder"))


def test_tasks_and_weights_from_the_spec(folder: Fixture) -> None:
    dm = FolderDataModule(folder.root)
    assert dm.task_names == ["semseg", "surface", "depth", "normals", "edge"]
    semseg, surface, depth, normals, edge = dm.tasks
    assert isinstance(semseg, SegmentationTask) and semseg.class_names == ["background", "road", "car"]
    assert isinstance(surface, SegmentationTask) and surface.num_classes == 2
    assert isinstance(depth, DepthTask) and isinstance(normals, NormalsTask) and isinstance(edge, EdgeTask)
    assert dm.loss_weights == {"semseg": 1.0, "surface": 1.0, "depth": 1.0, "normals": 10.0, "edge": 1.0}
    assert dm.disk_splits == ("train", "val") and dm.stage_splits["test"] == "val"


def test_decodings(folder: Fixture) -> None:
    dm = FolderDataModule(folder.root)
    dataset = dm.build_split("val", dm.tasks)
    assert dataset.ids == folder.splits["val"]
    for index, image_id in enumerate(dataset.ids):
        raw, sample = folder.raw[image_id], dataset[index]
        np.testing.assert_array_equal(sample["image"].numpy(), raw["image"].transpose(2, 0, 1))
        np.testing.assert_array_equal(sample["semseg"].numpy(), raw["semseg"])
        np.testing.assert_array_equal(sample["surface"].numpy(), raw["surface"])
        np.testing.assert_allclose(sample["depth"][0].numpy(), raw["depth_mm"] / 1000.0, rtol=1e-6)
        np.testing.assert_array_equal(sample["edge"][0].numpy(), raw["edge"])
        normals = sample["normals"].numpy()
        assert (normals[:, :2] == 0).all()  # black pixels are invalid
        np.testing.assert_allclose(normals[:, 2:], (2.0 * raw["normals"][2:] / 255.0 - 1.0).transpose(2, 0, 1), atol=1e-6)


def test_training_transform_follows_custom_names(folder: Fixture) -> None:
    dm = FolderDataModule(folder.root, train_size=(16, 16), batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16)
    assert batch["surface"].shape == (2, 16, 16) and batch["normals"].shape == (2, 3, 16, 16)
    val = dm.datasets["val"][0]
    assert val["surface"].shape == (28, 36)  # eval pads to train_size only when smaller


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"tasks": {"seg": {"kind": "semseg"}}}, "'classes' must list"),
        ({"tasks": {"seg": {"kind": "segmentation"}}}, "needs 'kind'"),
        ({"tasks": {"depth": {"kind": "depth"}}, "loss_weights": {"sal": 1.0}}, r"unknown task\(s\) \['sal'\]"),
        ({"task": {}}, "needs a 'tasks' mapping"),
    ],
)
def test_bad_specs_are_clear_errors(tmp_path: Path, spec: dict, message: str) -> None:
    (tmp_path / "polytask.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DataFileError, match=message):
        FolderDataModule(tmp_path)


def test_missing_spec(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match=r"polytask\.yaml: file not found"):
        FolderDataModule(tmp_path)


def test_predict_dir_replaces_the_predict_split(
    folder: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """``polytask predict --config configs/data/folder.yaml --data.init_args.predict_dir photos`` predicts the photos."""
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.jpg"):
        Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(photos / name)
    config = Path(__file__).resolve().parents[1] / "configs" / "data" / "folder.yaml"
    cli = lightning_main([
        "predict", "--config", str(config.parents[1] / "hard_sharing_synthscenes.yaml"), "--config", str(config),
        "--data.init_args.root", str(folder.root),
        "--data.init_args.predict_dir", str(photos), "--data.init_args.num_workers", "0",
        "--model.net.init_args.backbone", "test_resnet", "--model.net.init_args.decoder_channels", "8",
        "--model.net.init_args.head_channels", "4", "--trainer.logger", "false",
    ])  # fmt: skip
    assert isinstance(cli.datamodule.datasets["predict"], ImageFolder)
    assert f"predicted 2 image(s) of {photos}; 0 refused" in capfd.readouterr().err
