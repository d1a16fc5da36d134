"""protocol: maximum_roaming — the metrics of Maximum Roaming's scripts, on hand-computed examples.

Every expected number below is worked out by hand in the comments (from the rules of Maximum
Roaming's ``compute_miou``, ``compute_pix_acc``, ``depth_error``, ``normal_error`` and CelebA
evaluation loop), not by running the implementation; the split-level value of the same data is
given beside it where the two protocols differ. The equality with Maximum Roaming's own code on
random fixtures was checked outside the repository (see docs/evaluation.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import tiny_hard_sharing
from polytask.data.datasets.synthscenes import SynthScenesDataModule
from polytask.metrics import (
    AttributeMetric,
    DepthMetric,
    MaximumRoamingAttributeMetric,
    MaximumRoamingDepthMetric,
    MaximumRoamingNormalsMetric,
    MaximumRoamingSegmentationMetric,
    NormalsMetric,
    SegmentationMetric,
    check_protocol,
    protocol_setting,
)
from polytask.metrics.maximum_roaming import median_as_numpy
from polytask.tasks import build_task
from polytask.training import MetricReport
from polytask.training.module import MultiTaskModule

I = 255  # ignored pixel


def labels(*rows: list[int]) -> torch.Tensor:
    """``(B, 1, W)`` int64 label images from rows of pixels."""
    return torch.tensor(rows, dtype=torch.long)[:, None, :]


def one_vs_rest_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches (2, 2, 1 images of 1 x 4 pixels) of a one-vs-rest task (positive class 1)."""
    return [
        (labels([1, 1, 0, 0], [0, 0, 0, 0]), labels([1, 0, 1, I], [0, 0, 0, I])),
        (labels([1, 1, 1, 1], [0, 0, 0, 1]), labels([1, 1, 1, 1], [0, 0, 0, I])),
        (labels([0, 0, 0, 0]), labels([0, 0, 0, 0])),
    ]


def test_one_vs_rest_segmentation_per_image_iou_and_binary_pixel_accuracy() -> None:
    # Ignored pixels are negatives. Positive masks P (pred == 1) and T (target == 1):
    # batch 1, image 1: P = {0, 1}, T = {0, 2}: |P & T| = 1, |P | T| = 3 -> IoU 1/3
    #          image 2: P = T = {} -> empty union, not counted        -> batch IoU 1/3
    #          agreement: image 1 pixels 0 and 3 (3 is ignored, P = 0) -> 2/4; image 2: 4/4 -> 6/8
    # batch 2, image 3: P = T = {0..3} -> IoU 1; image 4: P = {3}, T = {} (3 ignored) -> IoU 0
    #          -> batch IoU 1/2; agreement 4/4 + 3/4 -> 7/8
    # batch 3: empty union -> skipped for IoU; agreement 4/4
    # IoU = (1/3 + 1/2) / 2 = 5/12 = 41.667 %; pixel_acc = (6/8 + 7/8 + 1) / 3 = 87.5 %
    metric = MaximumRoamingSegmentationMetric(2, positive_class=1)
    split_level = SegmentationMetric(2)
    for pred, target in one_vs_rest_batches():
        metric.update(pred, target)
        split_level.update(pred, target)
    result = metric.compute()
    assert float(result["mIoU"]) == pytest.approx(100 * 5 / 12)
    assert float(result["pixel_acc"]) == pytest.approx(87.5)
    assert float(result["batch_size"]) == 2
    # split-level, the 3 ignored pixels left out (17 valid): class 1 TP 5, FP 1, FN 1 -> 5/7; the
    # mean with class 0 (TP 10, FP 1, FN 1 -> 10/12) is 77.38 %; pixel accuracy 15/17 = 88.24 %
    assert float(split_level.compute()["mIoU"]) == pytest.approx(100 * (5 / 7 + 10 / 12) / 2)
    assert float(split_level.compute()["pixel_acc"]) == pytest.approx(100 * 15 / 17)


def test_multiclass_segmentation_scores_every_class_as_a_binary_mask() -> None:
    # pred [0, 1, 2, 2], target [0, 1, 1, ignored]; one image, one batch.
    # class 0: P = T = {0} -> 1; class 1: P = {1}, T = {1, 2} -> 1/2; class 2: P = {2, 3}, T = {} -> 0
    # mIoU = 1.5 / 3 = 50 %; agreement per class over the 4 pixels: 4, 3, 2 -> 9/12 = 75 %
    metric = MaximumRoamingSegmentationMetric(3)
    metric.update(labels([0, 1, 2, 2]), labels([0, 1, 1, I]))
    result = metric.compute()
    assert float(result["mIoU"]) == pytest.approx(50.0)
    assert float(result["pixel_acc"]) == pytest.approx(75.0)
    # split-level pixel accuracy: 2 of the 3 labelled pixels
    split_level = SegmentationMetric(3)
    split_level.update(labels([0, 1, 2, 2]), labels([0, 1, 1, I]))
    assert float(split_level.compute()["pixel_acc"]) == pytest.approx(200 / 3)


def test_a_class_never_seen_scores_zero_and_stays_in_the_mean() -> None:
    # class 2 has an empty union in every batch: its accumulator stays 0 (mIoU = (1 + 1 + 0) / 3)
    metric = MaximumRoamingSegmentationMetric(3)
    metric.update(labels([0, 1]), labels([0, 1]))
    assert float(metric.compute()["mIoU"]) == pytest.approx(200 / 3)


def test_depth_errors_are_averaged_per_batch() -> None:
    # batch 1: target [2, 0] (0 invalid), pred [3, 5]: abs 1 / 1, rel 0.5 / 1
    # batch 2: target [1, 1, 1, 1], pred [1, 1, 1, 2]: abs 1 / 4 = 0.25, rel 0.25
    # MR: abs_err (1 + 0.25) / 2 = 0.625, abs_rel (0.5 + 0.25) / 2 = 0.375
    # split-level: abs_err (1 + 1) / 5 = 0.4, abs_rel (0.5 + 1) / 5 = 0.3
    batches = [
        (torch.tensor([3.0, 5.0]).view(1, 1, 1, 2), torch.tensor([2.0, 0.0]).view(1, 1, 1, 2)),
        (torch.tensor([1.0, 1.0, 1.0, 2.0]).view(1, 1, 1, 4), torch.ones(1, 1, 1, 4)),
    ]
    metric, split_level = MaximumRoamingDepthMetric(), DepthMetric()
    for pred, target in batches:
        metric.update(pred, target)
        split_level.update(pred, target)
    result = metric.compute()
    assert float(result["abs_err"]) == pytest.approx(0.625)
    assert float(result["abs_rel"]) == pytest.approx(0.375)
    assert float(result["batch_size"]) == 1
    assert float(split_level.compute()["abs_err"]) == pytest.approx(0.4)
    assert float(split_level.compute()["abs_rel"]) == pytest.approx(0.3)


def test_a_batch_without_valid_depth_makes_the_result_nan() -> None:
    metric = MaximumRoamingDepthMetric()
    metric.update(torch.ones(1, 1, 1, 2), torch.tensor([1.0, 2.0]).view(1, 1, 1, 2))
    metric.update(torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))  # 0 / 0 in the script
    assert math.isnan(float(metric.compute()["abs_err"]))


def normals(*vectors: tuple[float, float, float]) -> torch.Tensor:
    """``(1, 3, 1, N)`` from N vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, len(vectors))


def test_normal_errors_are_averaged_per_batch_with_numpy_median() -> None:
    up = (0.0, 0.0, 1.0)
    # batch 1: angles 0 and 90; a third pixel has a unit target whose components sum to 0: masked
    #   mean 45, median (0 + 90) / 2 = 45, below 11.25 / 22.5 / 30: 1/2 each
    # batch 2: angles 0, 60, 180: mean 80, median 60, below each threshold: 1/3
    # MR: mean (45 + 80) / 2 = 62.5, median (45 + 60) / 2 = 52.5, fractions (1/2 + 1/3) / 2 = 5/12
    # split-level also scores the masked pixel (a non-zero target; angle 90): over the 6 angles
    # the mean is 420 / 6 = 70
    s = math.sqrt(0.5)
    batches = [
        (normals(up, (1.0, 0.0, 0.0), up), normals(up, up, (s, -s, 0.0))),
        (normals(up, (math.sin(math.pi / 3), 0.0, 0.5), (0.0, 0.0, -1.0)), normals(up, up, up)),
    ]
    metric, split_level = MaximumRoamingNormalsMetric(), NormalsMetric()
    for pred, target in batches:
        metric.update(pred, target)
        split_level.update(pred, target)
    result = metric.compute()
    assert float(result["mean"]) == pytest.approx(62.5, abs=1e-4)
    assert float(result["median"]) == pytest.approx(52.5, abs=1e-4)
    for key in ("11.25", "22.5", "30"):
        assert float(result[key]) == pytest.approx(100 * 5 / 12)
    assert float(split_level.compute()["mean"]) == pytest.approx(70.0, abs=1e-4)


def test_median_as_numpy() -> None:
    assert float(median_as_numpy(torch.tensor([3.0, 1.0, 2.0]))) == 2.0
    assert float(median_as_numpy(torch.tensor([4.0, 1.0, 2.0, 3.0]))) == 2.5
    assert math.isnan(float(median_as_numpy(torch.tensor([]))))


def test_attributes_accuracy_per_batch_precision_recall_f1_over_the_split() -> None:
    # attribute a: batch 1 pred [0.9, 0.2], target [1, 1] -> correct 1 of 2; batch 2 pred [0.7], target [0] -> 0 of 1
    #   TP 1, FP 1, FN 1: precision 1/2, recall 1/2, f1 1/2; accuracy (1/2 + 0) / 2 = 1/4 (split-level 1/3)
    # attribute b: never present, never predicted: precision 0 / 1e-7 = 0, recall 0, f1 0; accuracy 1
    # means over the 2 attributes: precision 1/4, recall 1/4, f1 1/4, accuracy 5/8 (split-level 2/3)
    batches = [
        (torch.tensor([[0.9, 0.1], [0.2, 0.1]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])),
        (torch.tensor([[0.7, 0.1]]), torch.tensor([[0.0, 0.0]])),
    ]
    metric, split_level = MaximumRoamingAttributeMetric(2), AttributeMetric(2)
    for pred, target in batches:
        metric.update(pred, target)
        split_level.update(pred, target)
    result = metric.compute()
    for key in ("precision", "recall", "f1"):
        assert float(result[key]) == pytest.approx(0.25, rel=1e-6)  # 1e-7 in the denominators
    assert float(result["accuracy"]) == pytest.approx(5 / 8)
    assert float(result["batch_size"]) == 2
    assert metric.per_attribute()["accuracy"].tolist() == pytest.approx([0.25, 1.0])
    assert float(split_level.compute()["accuracy"]) == pytest.approx(100 * 2 / 3)


def test_states_merge_like_a_distributed_sync() -> None:
    # the one-vs-rest example, its first two batches in one metric and the third in another
    # (sums of per-batch values and counts; the largest batch size)
    first = MaximumRoamingSegmentationMetric(2, positive_class=1)
    second = MaximumRoamingSegmentationMetric(2, positive_class=1)
    batches = one_vs_rest_batches()
    for pred, target in batches[:2]:
        first.update(pred, target)
    second.update(*batches[2])
    second.merge_state(first)
    result = second.compute()
    assert float(result["mIoU"]) == pytest.approx(100 * 5 / 12)
    assert float(result["pixel_acc"]) == pytest.approx(87.5)
    assert float(result["batch_size"]) == 2


def test_tasks_build_the_metric_of_the_protocol() -> None:
    binary = build_task("semseg", name="seg_bed", num_classes=2, positive_class=1)
    assert isinstance(binary.make_metric("maximum_roaming"), MaximumRoamingSegmentationMetric)
    assert binary.make_metric("maximum_roaming").classes.tolist() == [1]
    assert build_task("semseg", num_classes=13).make_metric("maximum_roaming").classes.tolist() == list(range(13))
    assert isinstance(build_task("semseg", num_classes=13).make_metric(), SegmentationMetric)
    assert isinstance(build_task("depth").make_metric("maximum_roaming"), MaximumRoamingDepthMetric)
    assert isinstance(build_task("normals").make_metric("maximum_roaming"), MaximumRoamingNormalsMetric)
    attributes = build_task("attributes", name="eyes", attribute_names=["a", "b"])
    assert isinstance(attributes.make_metric("maximum_roaming"), MaximumRoamingAttributeMetric)
    for kind in ("sal", "edge"):
        with pytest.raises(ValueError, match="no metric under protocol 'maximum_roaming'"):
            build_task(kind).make_metric("maximum_roaming")
    with pytest.raises(ValueError, match="unknown metric protocol"):
        build_task("depth").make_metric("mtan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive_class"):
        build_task("semseg", num_classes=2, positive_class=2)
    assert check_protocol("maximum_roaming") == "maximum_roaming"
    assert protocol_setting("split_level").startswith("protocol=split_level")


def test_shape_and_label_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        MaximumRoamingSegmentationMetric(2).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="class id 5"):
        MaximumRoamingSegmentationMetric(2).update(labels([0]), labels([5]))
    with pytest.raises(TypeError, match="integer labels"):
        MaximumRoamingSegmentationMetric(2).update(torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        MaximumRoamingDepthMetric().update(torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1))


def test_module_validates_under_the_protocol_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = ["semseg", "depth", "normals"]
    data = SynthScenesDataModule(tasks, num_train=2, num_val=3, image_size=(32, 48), cache_dir=str(tmp_path), batch_size=2)
    net = tiny_hard_sharing()
    model = MultiTaskModule(net=net, tasks=data.tasks, metric_protocol="maximum_roaming")
    assert isinstance(model.metrics["val"]["depth"], MaximumRoamingDepthMetric)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[MetricReport(json_dir=str(tmp_path))])
    trainer.validate(model, datamodule=data)
    results = model.results["val"]
    assert {"mIoU", "pixel_acc", "batch_size"} <= set(results["semseg"])
    assert {"abs_err", "abs_rel", "batch_size"} == set(results["depth"])
    assert results["normals"]["batch_size"] == 2  # batches of 2 and 1
    assert model.evaluation_settings()["metrics"].startswith("protocol=maximum_roaming")
    assert "protocol=maximum_roaming" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown metric protocol"):
        MultiTaskModule(net=net, tasks=data.tasks, metric_protocol="mr")  # type: ignore[arg-type]
