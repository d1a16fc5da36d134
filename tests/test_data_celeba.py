"""CelebA reader: layouts, the 8 attribute groups, -1/1 -> 0/1, resize to 64x78."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_data import write_celeba
from polytask.data.check import check_dataset
from polytask.data.datasets.celeba import ATTRIBUTE_GROUPS, CelebADataModule, resized_size
from polytask.data.io import DataFileError
from polytask.tasks import AttributeTask

GROUP_NAMES = ["global", "eyes", "hair", "mouth", "nose", "beard", "cheeks", "accessories"]


@pytest.mark.parametrize("nested", [False, True])
def test_groups_labels_and_images(tmp_path: Path, nested: bool) -> None:
    fixture = write_celeba(tmp_path, nested=nested)
    dm = CelebADataModule(tmp_path)
    assert dm.task_names == GROUP_NAMES and all(isinstance(t, AttributeTask) for t in dm.tasks)
    assert sorted(i for cols in ATTRIBUTE_GROUPS.values() for i in cols) == list(range(40))
    eyes = dm.tasks[1]
    assert eyes.attribute_names == ["Bags_Under_Eyes", "Eyeglasses", "Narrow_Eyes", "Arched_Eyebrows", "Bushy_Eyebrows"]
    assert dm.loss_weights == dict.fromkeys(GROUP_NAMES, 1.0)
    for split in ("train", "val", "test"):
        dataset = dm.make_dataset(split)
        assert dataset.ids == fixture.splits[split]
        sample = dataset[0]
        assert sample["image"].shape == (3, 78, 64) and sample["image"].dtype == torch.float32
        row = fixture.raw[dataset.ids[0]]["attributes"]
        for group, columns in zip(GROUP_NAMES, ATTRIBUTE_GROUPS.values()):
            expected = (row[list(columns)] == 1).astype(np.float32)
            np.testing.assert_array_equal(sample[group].numpy(), expected)
            assert sample[group].dtype == torch.float32
    assert dm.stage_splits["predict"] == "test"


def test_attribute_names_come_from_the_header(tmp_path: Path) -> None:
    write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("Eyeglasses", "Spectacles")
    path.write_text("\n".join(lines) + "\n")
    dm = CelebADataModule(tmp_path)
    assert dm.tasks[1].attribute_names == ["Bags_Under_Eyes", "Spectacles", "Narrow_Eyes", "Arched_Eyebrows", "Bushy_Eyebrows"]


def test_resize_rule_matches_torchvision() -> None:
    assert resized_size(218, 178, 64) == (78, 64)
    assert resized_size(100, 200, 64) == (64, 128)


def test_bad_values_and_layouts(tmp_path: Path) -> None:
    write_celeba(tmp_path)
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    fields = lines[3].split()
    fields[5] = "0"
    lines[3] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")
    report = check_dataset("celeba", tmp_path)
    assert [(p.sample, p.kind) for p in report.problems] == [(fields[0], "out_of_range")]
    with pytest.raises(DataFileError, match="not a CelebA root"):
        CelebADataModule(tmp_path / "elsewhere")
