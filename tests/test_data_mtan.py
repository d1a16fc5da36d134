"""MTAN .npy readers (NYUv2, Cityscapes) in the multi-class and the binary task split."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_data import Fixture, write_mtan_cityscapes, write_mtan_nyuv2
from polytask.constants import IMAGENET_MEAN, IMAGENET_STD
from polytask.data.datasets.mtan import CityscapesMTANDataModule, NYUv2MTANDataModule
from polytask.data.io import DataFileError


@pytest.fixture(scope="module")
def nyuv2(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return write_mtan_nyuv2(tmp_path_factory.mktemp("nyuv2"))


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return write_mtan_cityscapes(tmp_path_factory.mktemp("cityscapes"))


def expected_labels(raw: np.ndarray) -> np.ndarray:
    return np.where(raw == -1, 255, raw).astype(np.int64)


def test_nyuv2_multiclass_decodings(nyuv2: Fixture) -> None:
    dm = NYUv2MTANDataModule(nyuv2.root)
    assert dm.task_names == ["semseg", "depth", "normals"] and dm.tasks[0].num_classes == 13
    assert dm.loss_weights == {"semseg": 1.0, "depth": 1.0, "normals": 1.0}
    dataset = dm.make_dataset("val")
    assert dataset.ids == ["0", "1"]
    raw, sample = nyuv2.raw["val/1"], dataset[1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected_image = (torch.from_numpy(raw["image"]).permute(2, 0, 1) - mean) / std
    torch.testing.assert_close(sample["image"], expected_image, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(sample["semseg"].numpy(), expected_labels(raw["label"]))
    assert (sample["semseg"] == 255).any()
    np.testing.assert_array_equal(sample["depth"].numpy(), raw["depth"].transpose(2, 0, 1))
    assert (sample["depth"][:, :2] == 0).all()
    normals = sample["normals"].numpy()
    masked = raw["normal"].sum(axis=2) == 0
    assert masked[0, 0] and masked[-3:].all()
    assert (normals[:, masked] == 0).all()
    np.testing.assert_array_equal(normals[:, ~masked], raw["normal"][~masked].T)


def test_nyuv2_binary_split(nyuv2: Fixture) -> None:
    dm = NYUv2MTANDataModule(nyuv2.root, task_split="binary")
    assert dm.task_names[:3] == ["seg_bed", "seg_books", "seg_ceiling"] and dm.task_names[-2:] == ["depth", "normals"]
    assert len(dm.tasks) == 15 and all(t.num_classes == 2 for t in dm.tasks[:13])
    sample = dm.build_split("train", dm.tasks)[0]
    labels = expected_labels(nyuv2.raw["train/0"]["label"])
    for index, name in enumerate(dm.task_names[:13]):
        expected = np.where(labels == 255, 255, (labels == index).astype(np.int64))
        np.testing.assert_array_equal(sample[name].numpy(), expected)


def test_cityscapes_7_and_19_classes(cityscapes: Fixture) -> None:
    seven = CityscapesMTANDataModule(cityscapes.root)
    assert seven.task_names == ["semseg", "depth"] and seven.tasks[0].class_names[-1] == "vehicle"
    sample = seven.build_split("train", seven.tasks)[2]
    np.testing.assert_array_equal(sample["semseg"].numpy(), expected_labels(cityscapes.raw["train/2"]["label_7"]))
    np.testing.assert_array_equal(sample["depth"][0].numpy(), cityscapes.raw["train/2"]["depth"][..., 0])
    nineteen = CityscapesMTANDataModule(cityscapes.root, num_classes=19, task_split="binary")
    assert "seg_traffic_light" in nineteen.task_names and len(nineteen.tasks) == 20
    sample = nineteen.build_split("val", nineteen.tasks)[0]
    labels = expected_labels(cityscapes.raw["val/0"]["label_19"])
    np.testing.assert_array_equal(sample["seg_traffic_light"].numpy(), np.where(labels == 255, 255, (labels == 6).astype(np.int64)))
    with pytest.raises(ValueError, match="num_classes must be 7 or 19"):
        CityscapesMTANDataModule(cityscapes.root, num_classes=8)  # type: ignore[arg-type]


def test_libmtl_label_folder_and_missing_labels(tmp_path: Path) -> None:
    fixture = write_mtan_cityscapes(tmp_path)
    for split in ("train", "val"):
        shutil.move(tmp_path / split / "label_7", tmp_path / split / "label")
    dm = CityscapesMTANDataModule(tmp_path)
    np.testing.assert_array_equal(dm.build_split("val", dm.tasks)[1]["semseg"].numpy(), expected_labels(fixture.raw["val/1"]["label_7"]))
    shutil.rmtree(tmp_path / "val" / "label_19")
    nineteen = CityscapesMTANDataModule(tmp_path, num_classes=19)
    with pytest.raises(DataFileError, match=r"no label folder \(val/label_19/\)"):
        nineteen.build_split("val", nineteen.tasks)
