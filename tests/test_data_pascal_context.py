"""PASCAL-Context (PASCAL_MT) reader: every decoding value by value on a fixture in the published layout."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_data import Fixture, write_pascal_context
from polytask.data.datasets.pascal_context import PascalContextDataModule, boundary_map
from polytask.data.io import DataFileError
from polytask.tasks import EdgeTask, NormalsTask, SaliencyTask, SegmentationTask

# LabelMap and its boundaries as computed by the reference (cv2.Laplacian(LabelMap, CV_64F) and
# skimage.morphology.thin), recorded once with OpenCV installed.
LABEL_MAP = np.array(
    [[1, 1, 1, 1, 1, 7, 7, 7, 7, 7]] * 4 + [[1, 1, 1, 30, 30, 30, 30, 7, 7, 7]] * 2 + [[2, 2, 1, 30, 30, 30, 30, 7, 7, 7]] * 2,
    dtype=np.uint16,
)
REFERENCE_BOUNDARIES = np.array(
    [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
    ],
    dtype=np.float32,
)


pytestmark = pytest.mark.usefixtures("fresh_cache")  # checks cached by one test never answer another


@pytest.fixture(scope="module")
def pascal(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return write_pascal_context(tmp_path_factory.mktemp("pascal"))


@pytest.fixture(scope="module")
def samples(pascal: Fixture) -> dict[str, dict]:
    dm = PascalContextDataModule(pascal.root)
    out = {}
    for split in ("train", "val"):
        dataset = dm.build_split(split, dm.tasks)
        out.update({dataset.ids[i]: dataset[i] for i in range(len(dataset))})
    return out


def test_boundaries_equal_the_reference_laplacian_and_thinning() -> None:
    np.testing.assert_array_equal(boundary_map(LABEL_MAP), REFERENCE_BOUNDARIES)


def test_sample_contract(samples: dict[str, dict], pascal: Fixture) -> None:
    sample = samples["2008_000001"]
    assert set(sample) == {"image", "semseg", "human_parts", "sal", "normals", "edge", "meta"}
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 40, 48)
    for key in ("semseg", "human_parts", "sal"):
        assert sample[key].dtype == torch.int64 and sample[key].shape == (40, 48)
    assert sample["normals"].dtype == torch.float32 and sample["normals"].shape == (3, 40, 48)
    assert sample["edge"].dtype == torch.float32 and sample["edge"].shape == (1, 40, 48)
    assert sample["meta"] == {"id": "2008_000001", "size": (40, 48)}


def test_semseg_sal_and_edges(samples: dict[str, dict], pascal: Fixture) -> None:
    for image_id, raw in pascal.raw.items():
        sample = samples[image_id]
        np.testing.assert_array_equal(sample["semseg"].numpy(), raw["semseg"])  # VOC12 or pascal-context folder
        assert (sample["semseg"][0] == 255).all()
        np.testing.assert_array_equal(sample["sal"].numpy(), (raw["sal"] >= 128).astype(np.int64))
        np.testing.assert_array_equal(sample["edge"][0].numpy(), boundary_map(raw["label_map"]))


def test_normals_kept_only_on_nyu_classes(samples: dict[str, dict], pascal: Fixture) -> None:
    for image_id, raw in pascal.raw.items():
        normals = samples[image_id]["normals"].numpy()
        valid = np.isin(raw["label_map"], [284, 427, 3])  # person, tvmonitor, and a NYU class; 1, 2, 5 are not
        expected = 2.0 * raw["normals"].astype(np.float32) / 255.0 - 1.0
        np.testing.assert_allclose(normals[:, valid], expected[valid].T, atol=1e-6)
        assert (normals[:, ~valid] == 0).all()


def test_human_parts(samples: dict[str, dict]) -> None:
    parts = samples["2008_000001"]["human_parts"].numpy()
    # hair, head -> 1; torso -> 2; luarm -> 3; llarm, rhand -> 4; luleg -> 5; rlleg, lfoot -> 6
    for (row, col), part in {
        (5, 15): 1, (8, 15): 1, (12, 15): 2, (12, 9): 3, (16, 9): 4, (19, 23): 4, (20, 11): 5, (25, 19): 6, (29, 11): 6,
    }.items():
        assert parts[row, col] == part
    assert parts[21, 29] == 0  # a dog's head is no person part
    assert parts[35, 2] == 0
    assert set(np.unique(parts)) == set(range(7))
    two = samples["2008_000004"]["human_parts"].numpy()
    assert two[5, 15] == 1 and two[12, 15] == 2 and two[30, 40] == 0  # the person without parts is background
    for image_id in ("2008_000002", "2008_000003", "2008_000005"):  # no person / person without parts / empty mask
        assert (samples[image_id]["human_parts"] == 255).all(), image_id


def test_datamodule_tasks_and_weights(pascal: Fixture) -> None:
    dm = PascalContextDataModule(pascal.root, tasks=["semseg", "human_parts", "edge"])
    semseg, parts, edge = dm.tasks
    assert isinstance(semseg, SegmentationTask) and semseg.num_classes == 21 and semseg.class_names[15] == "person"
    assert isinstance(parts, SegmentationTask) and parts.num_classes == 7
    assert isinstance(edge, EdgeTask)
    assert dm.loss_weights == {"semseg": 1.0, "human_parts": 2.0, "edge": 50.0}
    full = PascalContextDataModule(pascal.root)
    assert [type(t) for t in full.tasks[2:4]] == [SaliencyTask, NormalsTask]
    assert full.loss_weights == {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0}


def test_eval_pads_with_ignore_and_test_reads_val(pascal: Fixture) -> None:
    dm = PascalContextDataModule(pascal.root, eval_size=(44, 52))
    dm.setup("test")
    sample = dm.datasets["test"][0]
    assert sample["meta"]["id"] == "2008_000004"
    assert sample["image"].shape == (3, 44, 52) and (sample["image"][:, :2] == 0).all()
    assert (sample["semseg"][:2] == 255).all() and (sample["semseg"][:, :2] == 255).all()
    assert (sample["normals"][:, -2:] == 255).all() and (sample["edge"][:, :, -2:] == 255).all()


def test_train_samples_are_cropped_to_train_size(pascal: Fixture) -> None:
    dm = PascalContextDataModule(pascal.root, train_size=(32, 32), batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 3, 32, 32)
    assert batch["human_parts"].shape == batch["semseg"].shape == (3, 32, 32)
    assert batch["normals"].shape == (3, 3, 32, 32) and batch["edge"].shape == (3, 1, 32, 32)


def test_missing_split_list_is_a_clear_error(tmp_path: Path) -> None:
    write_pascal_context(tmp_path)
    (tmp_path / "ImageSets" / "Context" / "val.txt").unlink()
    dm = PascalContextDataModule(tmp_path)
    with pytest.raises(DataFileError, match=r"val\.txt: file not found"):
        dm.setup("validate")
