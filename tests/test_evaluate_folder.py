"""``polytask evaluate --dataset folder``: the user's own data (polytask.yaml), scored against
hand-computed values, with per-class IoU under the class names of polytask.yaml."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from polytask.cli.evaluate import main as evaluate_main
from polytask.evaluation.evaluate import evaluate_predictions

SHAPE = (8, 10)
CLASSES = ["sky", "road", "car"]
SPEC: dict[str, Any] = {
    "tasks": {"semseg": {"kind": "semseg", "classes": CLASSES}, "depth": {"kind": "depth", "png_scale": 1000}},
}


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _labels() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{id: (ground truth, prediction)}`` of semseg.

    a: rows 0-3 sky, rows 4-7 road (columns 0-4) and car (5-9); predicted: row 3 road, cars road.
    b: all sky, row 7 ignored (255); predicted: all sky, row 7 car (ignored pixels do not count).
    """
    gt_a = np.zeros(SHAPE, np.uint8)
    gt_a[4:, :5], gt_a[4:, 5:] = 1, 2
    pred_a = gt_a.copy()
    pred_a[3], pred_a[4:, 5:] = 1, 1
    gt_b = np.zeros(SHAPE, np.uint8)
    gt_b[7] = 255
    pred_b = np.zeros(SHAPE, np.uint8)
    pred_b[7] = 2
    return {"a": (gt_a, pred_a), "b": (gt_b, pred_b)}


def _depths() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{id: (ground truth mm, prediction m)}``: a 2 m predicted 2.5 m; b 1 m (row 0 invalid) predicted 1 m."""
    gt_b = np.full(SHAPE, 1000, np.uint16)
    gt_b[0] = 0
    return {
        "a": (np.full(SHAPE, 2000, np.uint16), np.full(SHAPE, 2.5, np.float32)),
        "b": (gt_b, np.full(SHAPE, 1.0, np.float32)),
    }


# By hand. semseg confusion over the 150 valid pixels (80 of a, 70 of b):
#   sky  TP 30 + 70 = 100, FN 10 (row 3 of a), FP 0         -> IoU 100 / 110
#   road TP 20, FP 10 (row 3) + 20 (the cars), FN 0         -> IoU 20 / 50
#   car  TP 0, FN 20, FP 0 (b's row 7 is ignored)           -> IoU 0
#   pixel accuracy 120 / 150
# depth over the 150 valid pixels: 80 errors of 0.5 m (relative 0.25), 70 exact.
PER_CLASS = {"sky": 100 * 100 / 110, "road": 100 * 20 / 50, "car": 0.0}
SEMSEG = {"mIoU": sum(PER_CLASS.values()) / 3, "pixel_acc": 100 * 120 / 150}
DEPTH = {
    "rmse": math.sqrt(80 * 0.25 / 150),
    "log_rmse": math.sqrt(80 * math.log(1.25) ** 2 / 150),
    "abs_rel": 80 * 0.25 / 150,
    "abs_err": 80 * 0.5 / 150,
}


def write_dataset(root: Path, test_split: bool = True) -> Path:
    """Ids a and b (the test split, when ``test_split``, else val), c (val: all sky, 3 m), t (train)."""
    root.mkdir(parents=True)
    (root / "polytask.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    splits = {"train": ["t"], "val": ["c"], "test": ["a", "b"]} if test_split else {"train": ["t"], "val": ["a", "b"]}
    for split, ids in splits.items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    labels, depths = _labels(), _depths()
    labels["c"] = labels["t"] = (np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8))
    depths["c"] = depths["t"] = (np.full(SHAPE, 3000, np.uint16), np.full(SHAPE, 3.0, np.float32))
    for sample in labels:
        _png(root / "images" / f"{sample}.png", np.full((*SHAPE, 3), 128, np.uint8))
        _png(root / "semseg" / f"{sample}.png", labels[sample][0])
        _png(root / "depth" / f"{sample}.png", depths[sample][0])
    return root


def write_predictions(pred: Path, ids: tuple[str, ...] = ("a", "b")) -> Path:
    """The predictions of ``ids`` (c: all sky, 3 m, i.e. exact)."""
    labels, depths = _labels(), _depths()
    labels["c"], depths["c"] = (None, np.zeros(SHAPE, np.uint8)), (None, np.full(SHAPE, 3.0, np.float32))
    (pred / "depth").mkdir(parents=True, exist_ok=True)
    for sample in ids:
        _png(pred / "semseg" / f"{sample}.png", labels[sample][1])
        np.save(pred / "depth" / f"{sample}.npy", depths[sample][1])
    return pred


def test_scores_equal_the_hand_computed_values_on_the_test_split(tmp_path: Path) -> None:
    root, pred = write_dataset(tmp_path / "data"), write_predictions(tmp_path / "pred")
    report = evaluate_predictions("folder", root, pred)
    assert report.ok, report.problems
    assert (report.split, report.n_images) == ("test", 2)  # the default split: test, as the dataset has one
    assert report.settings["tasks"] == ["semseg", "depth"]
    assert report.results["semseg"] == pytest.approx(SEMSEG, rel=1e-9)
    assert report.results["depth"] == pytest.approx(DEPTH, rel=1e-6)
    assert list(report.per_class_iou) == ["semseg"]
    assert list(report.per_class_iou["semseg"]) == CLASSES  # the names of polytask.yaml, in id order
    assert report.per_class_iou["semseg"] == pytest.approx(PER_CLASS, rel=1e-9)


def test_the_command_prints_and_writes_per_class_iou_under_the_class_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, pred = write_dataset(tmp_path / "data"), write_predictions(tmp_path / "pred")
    (pred / "pictures").mkdir()  # the PredictionWriter's pictures are no task's predictions
    out = tmp_path / "out.json"
    assert evaluate_main(["--dataset", "folder", "--root", str(root), "--pred-dir", str(pred), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "folder test: 2 images" in printed
    assert "semseg: IoU per class (%)" in printed
    for name, value in (("sky", "90.91"), ("road", "40.00"), ("car", "0.00")):
        assert any(name in line and value in line for line in printed.splitlines()), (name, printed)
    payload = json.loads(out.read_text())
    assert (payload["dataset"], payload["split"], payload["n_images"]) == ("folder", "test", 2)
    assert payload["results"]["semseg"] == pytest.approx(SEMSEG, rel=1e-9)
    assert payload["per_class_iou"] == {"semseg": pytest.approx(PER_CLASS, rel=1e-9)}
    assert list(payload["per_class_iou"]["semseg"]) == CLASSES


def test_split_option_and_the_val_default_without_a_test_split(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data")
    report = evaluate_predictions("folder", root, write_predictions(tmp_path / "pred_c", ("c",)), split="val")
    assert report.ok, report.problems
    assert (report.split, report.n_images) == ("val", 1)
    assert report.per_class_iou["semseg"] == {"sky": 100.0, "road": 0.0, "car": 0.0}  # absent classes score 0, as in mIoU
    assert report.results["depth"]["rmse"] == 0.0

    no_test = write_dataset(tmp_path / "data_no_test", test_split=False)
    report = evaluate_predictions("folder", no_test, write_predictions(tmp_path / "pred"))
    assert (report.split, report.n_images) == ("val", 2)
    assert report.results["semseg"] == pytest.approx(SEMSEG, rel=1e-9)


def test_bad_predictions_are_listed_with_file_task_and_expectation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, pred = write_dataset(tmp_path / "data"), write_predictions(tmp_path / "pred")
    _png(pred / "sal" / "a.png", np.zeros(SHAPE, np.uint8))  # a task polytask.yaml does not define
    (pred / "depth" / "b.npy").unlink()
    _png(pred / "semseg" / "a.png", np.zeros((4, 5), np.uint8))
    args = ["--dataset", "folder", "--root", str(root), "--pred-dir", str(pred)]
    assert evaluate_main(args) == 1
    printed = capsys.readouterr().out
    assert "3 problem(s)" in printed and "nothing was scored" in printed
    lines = " ".join(printed.split())  # rich wraps long lines
    assert (
        f"{pred / 'sal'}: predictions of task 'sal', which {root / 'polytask.yaml'} does not define "
        "(its tasks: semseg, depth)"
    ) in lines
    assert f"{pred / 'depth' / 'b.npy'}: task 'depth': file not found (expected .npy or .png)" in lines
    assert f"{pred / 'semseg' / 'a.png'}: task 'semseg': size 4x5 differs from the ground truth's 8x10 (H x W)" in lines

    shutil.rmtree(pred / "sal")
    write_predictions(pred)  # headers right again: the values are checked when decoding
    _png(pred / "semseg" / "b.png", np.full(SHAPE, 3, np.uint8))
    assert evaluate_main(args) == 1
    lines = " ".join(capsys.readouterr().out.split())
    assert f"{pred / 'semseg' / 'b.png'}: task 'semseg': class id(s) [3] outside 0..2" in lines


def test_bad_arguments_and_a_bad_polytask_yaml_exit_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, pred = write_dataset(tmp_path / "data"), write_predictions(tmp_path / "pred")
    base = ["--dataset", "folder", "--root", str(root), "--pred-dir", str(pred)]
    assert evaluate_main([*base, "--tasks", "sal"]) == 2
    assert "unknown task(s) ['sal']" in capsys.readouterr().err
    assert evaluate_main([*base, "--split", "extra"]) == 2
    assert "folder has no split 'extra'; it has ['train', 'val', 'test']" in capsys.readouterr().err
    spec = yaml.safe_load((root / "polytask.yaml").read_text())
    spec["tasks"]["semseg"]["classes"] = ["sky", "road", "sky"]
    (root / "polytask.yaml").write_text(yaml.safe_dump(spec))
    assert evaluate_main(base) == 2
    err = capsys.readouterr().err
    assert f"{root / 'polytask.yaml'}: task 'semseg' (semseg): class name(s) ['sky'] listed more than once" in err
    (root / "polytask.yaml").unlink()
    assert evaluate_main(base) == 2
    assert f"folder root {root}: {root / 'polytask.yaml'}: file not found" in capsys.readouterr().err
