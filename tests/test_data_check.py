"""``polytask data check`` and the datamodules' refusal of broken datasets."""

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_data import (
    write_celeba,
    write_folder,
    write_mtan_cityscapes,
    write_mtan_nyuv2,
    write_nyud,
    write_pascal_context,
)
from polytask.cli.data import main as data_main
from polytask.data import problems
from polytask.data.check import check_dataset
from polytask.data.datasets.nyud import NYUDDataModule
from polytask.data.io import DataFileError
from polytask.data.problems import BrokenDatasetError

pytestmark = pytest.mark.usefixtures("fresh_cache")  # checks cached by one test never answer another


def broken_nyud(root: Path) -> None:
    """NYUD (ATRC) with one problem per sample: missing label, corrupt image, class 44, size mismatch, truncated image, NaN depth."""
    write_nyud(root, "atrc", n_train=5, n_val=2)
    (root / "segmentation" / "0000.png").unlink()
    (root / "images" / "0001.png").write_bytes(b"this is not a png")
    seg = np.array(Image.open(root / "segmentation" / "0002.png"))
    seg[5, 5] = 45
    Image.fromarray(seg).save(root / "segmentation" / "0002.png")
    Image.fromarray(np.zeros((30, 44, 3), np.uint8)).save(root / "normals" / "0003.png")
    data = (root / "images" / "0005.png").read_bytes()
    (root / "images" / "0005.png").write_bytes(data[: len(data) // 2])
    depth = np.load(root / "depth" / "0006.npy")
    depth[3, 7] = np.nan
    np.save(root / "depth" / "0006.npy", depth)


EXPECTED = {
    ("train", "0000", "missing", "segmentation/0000.png"),
    ("train", "0001", "unreadable", "images/0001.png"),
    ("train", "0002", "out_of_range", "segmentation/0002.png"),
    ("train", "0003", "shape_mismatch", "normals/0003.png"),
    ("val", "0005", "truncated", "images/0005.png"),
    ("val", "0006", "nan", "depth/0006.npy"),
}


def test_check_reports_every_problem_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    broken_nyud(tmp_path)
    report = check_dataset("nyud", tmp_path)
    found = {(p.split, p.sample, p.kind, str(Path(p.path).relative_to(tmp_path))) for p in report.problems}
    assert found == EXPECTED
    assert report.splits["train"].samples == 5 and report.splits["train"].bad_samples == 4
    assert report.splits["val"].samples == 2 and report.splits["val"].bad_samples == 2
    assert report.notes == ["NYUD root holds the ATRC/InvPT version (PNG images, normals and edges as PNG)"]
    assert data_main(["check", "--dataset", "nyud", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    for *_, path in EXPECTED:
        assert path in out
    for kind in ("missing", "unreadable", "out_of_range", "shape_mismatch", "truncated", "nan"):
        assert kind in out


def test_quick_check_skips_decoding(tmp_path: Path) -> None:
    broken_nyud(tmp_path)
    kinds = {p.kind for p in check_dataset("nyud", tmp_path, full=False).problems}
    assert kinds == {"missing", "unreadable", "shape_mismatch", "truncated"}


WRITERS: dict[str, Callable[[Path], object]] = {
    "pascal_context": write_pascal_context,
    "nyud": lambda root: write_nyud(root, "mti-net"),
    "nyuv2_mtan": write_mtan_nyuv2,
    "cityscapes_mtan": write_mtan_cityscapes,
    "celeba": write_celeba,
    "folder": write_folder,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_clean_datasets_pass(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    WRITERS[name](tmp_path)
    assert data_main(["check", "--dataset", name, "--root", str(tmp_path)]) == 0
    assert "no problems found" in capsys.readouterr().out


def test_options_and_layout_problems(tmp_path: Path) -> None:
    write_mtan_cityscapes(tmp_path)
    assert data_main(["check", "--dataset", "cityscapes_mtan", "--root", str(tmp_path), "--set", "num_classes=19"]) == 0
    report = check_dataset("nyud", tmp_path / "missing")
    assert [(p.kind, p.split) for p in report.problems] == [("layout", "-")]
    write_pascal_context(tmp_path / "pascal")
    (tmp_path / "pascal" / "ImageSets" / "Context" / "val.txt").unlink()
    report = check_dataset("pascal_context", tmp_path / "pascal")
    assert [(p.split, p.kind) for p in report.problems] == [("val", "missing")]
    assert report.splits["train"].samples == 3


def test_setup_refuses_a_broken_dataset(tmp_path: Path) -> None:
    broken_nyud(tmp_path)
    with pytest.raises(BrokenDatasetError, match=r"3 bad sample\(s\) in split 'train'") as info:
        NYUDDataModule(tmp_path, batch_size=1).setup("fit")
    assert "polytask data check --dataset nyud" in str(info.value)
    assert {p.sample for p in info.value.problems} == {"0000", "0001", "0003"}


def test_setup_can_skip_bad_samples(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken_nyud(tmp_path)
    dm = NYUDDataModule(tmp_path, on_bad_samples="skip", batch_size=1)
    with caplog.at_level(logging.WARNING, logger="polytask.data.check"):
        dm.setup("fit")
    assert dm.datasets["train"].ids == ["0002", "0004"] and dm.datasets["val"].ids == ["0006"]
    assert "skipping 3 bad sample(s) of 5: 0000, 0001, 0003" in caplog.text
    with pytest.raises(DataFileError, match=r"0002\.png: class id\(s\) \[44\] outside 0\.\.39"):
        dm.datasets["train"][0]


def test_quick_check_is_cached_until_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_nyud(tmp_path, "atrc")
    NYUDDataModule(tmp_path).setup("validate")
    calls: list[str] = []
    original = problems.check_split

    def counting(*args: object, **kwargs: object) -> list:
        calls.append("check")
        return original(*args, **kwargs)

    monkeypatch.setattr(problems, "check_split", counting)
    NYUDDataModule(tmp_path).setup("validate")
    assert calls == []
    image = tmp_path / "images" / "0003.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    NYUDDataModule(tmp_path).setup("validate")
    assert calls == ["check"]
