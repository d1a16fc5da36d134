"""NYUD_MT reader in both circulating versions: detection and decodings value by value."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_data import Fixture, write_nyud
from polytask.data.datasets.nyud import NYUDDataModule, detect_version
from polytask.data.io import DataFileError

pytestmark = pytest.mark.usefixtures("fresh_cache")  # checks cached by one test never answer another


@pytest.fixture(scope="module", params=["atrc", "mti-net"])
def nyud(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return write_nyud(tmp_path_factory.mktemp(request.param), request.param)


def test_version_is_detected_and_logged(nyud: Fixture, caplog: pytest.LogCaptureFixture) -> None:
    version = nyud.root.name.rstrip("0123456789")
    with caplog.at_level(logging.INFO, logger="polytask.data.datasets.nyud"):
        dm = NYUDDataModule(nyud.root)
    assert dm.version == version == detect_version(nyud.root)
    assert ("ATRC/InvPT" if version == "atrc" else "MTI-Net") in caplog.text
    assert dm.train_size == ((448, 576) if version == "atrc" else (480, 640))
    expected = "PNG images, normals and edges as PNG" if version == "atrc" else "JPG images, normals and edges as .npy"
    assert len(dm.layout_notes()) == 1 and expected in dm.layout_notes()[0]


def test_decodings(nyud: Fixture) -> None:
    dm = NYUDDataModule(nyud.root)
    for split, ids in nyud.splits.items():
        dataset = dm.build_split(split, dm.tasks)
        assert dataset.ids == ids
        for index, image_id in enumerate(ids):
            raw, sample = nyud.raw[image_id], dataset[index]
            seg = sample["semseg"].numpy()
            assert sample["semseg"].dtype == torch.int64
            np.testing.assert_array_equal(seg[raw["segmentation"] == 0], 255)
            np.testing.assert_array_equal(seg[raw["segmentation"] > 0], raw["segmentation"][raw["segmentation"] > 0] - 1)
            np.testing.assert_array_equal(sample["depth"][0].numpy(), raw["depth"])
            assert (sample["depth"][0, :, :3] == 0).all()  # 0 = invalid, kept as 0
            if dm.version == "atrc":
                np.testing.assert_array_equal(sample["image"].numpy(), raw["image"].transpose(2, 0, 1))
                np.testing.assert_allclose(sample["normals"].numpy(), (2.0 * raw["normals"] / 255.0 - 1.0).transpose(2, 0, 1), atol=1e-6)
                np.testing.assert_array_equal(sample["edge"][0].numpy(), raw["edge"] / 255.0)
            else:
                np.testing.assert_array_equal(sample["normals"].numpy(), raw["normals"].transpose(2, 0, 1))
                assert (sample["normals"][:, -2:] == 0).all()  # invalid normals stay all-zero
                np.testing.assert_array_equal(sample["edge"][0].numpy(), raw["edge"])


def test_tasks_and_weights(nyud: Fixture) -> None:
    dm = NYUDDataModule(nyud.root)
    assert dm.task_names == ["semseg", "depth", "normals", "edge"]
    assert dm.tasks[0].num_classes == 40 and dm.tasks[0].class_names[0] == "wall"
    assert dm.loss_weights == {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}


def test_eval_padding_marks_depth_and_normals_ignore(nyud: Fixture) -> None:
    dm = NYUDDataModule(nyud.root, eval_size=(40, 48))
    dm.setup("validate")
    sample = dm.datasets["val"][0]
    assert sample["depth"].shape == (1, 40, 48)
    assert (sample["depth"][:, :2] == 255).all() and (sample["normals"][:, :2] == 255).all()
    assert (sample["depth"][:, 2:38, 2:5] == 0).all()  # invalid depth stays 0 inside the image


def test_neither_version_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0001.bmp").write_bytes(b"")
    with pytest.raises(DataFileError, match=r"not an NYUD multi-task root of a known version.*images/: \['\.bmp'\]"):
        NYUDDataModule(tmp_path)
    with pytest.raises(DataFileError, match="not an NYUD multi-task root"):
        NYUDDataModule(tmp_path / "nowhere")


def test_mixed_versions_are_refused(tmp_path: Path) -> None:
    write_nyud(tmp_path / "atrc", "atrc")
    write_nyud(tmp_path / "mti", "mti-net")
    shutil.rmtree(tmp_path / "atrc" / "normals")
    shutil.copytree(tmp_path / "mti" / "normals", tmp_path / "atrc" / "normals")
    with pytest.raises(DataFileError, match=r"normals/: \['\.npy'\]"):
        detect_version(tmp_path / "atrc")
