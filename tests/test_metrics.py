"""Hand-computed checks of the split-level metrics and of Delta_m."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import torch
from torchmetrics import Metric

from polytask.metrics import (
    AttributeMetric,
    BoundaryFMetric,
    DepthMetric,
    NormalsMetric,
    SaliencyMetric,
    SegmentationMetric,
    delta_m,
    load_reference,
)

IGN = 255


def approx(value: torch.Tensor | float, expected: float, tol: float = 1e-6) -> bool:
    return math.isclose(float(value), expected, rel_tol=tol, abs_tol=tol)


# ---------------------------------------------------------------- segmentation


def test_segmentation_ignore_and_absent_class_policies() -> None:
    # valid pixels: (gt 0, pred 0) TP, (gt 0, pred 1) FN0 + FP1, (gt 1, pred 1) TP;
    # the pixel predicting class 2 is ignored, so class 2 is absent from the split.
    pred = torch.tensor([[[0, 1], [1, 2]]])
    target = torch.tensor([[[0, 0], [1, IGN]]])
    zero = SegmentationMetric(3)
    nan = SegmentationMetric(3, absent_class_policy="nan")
    zero.update(pred, target)
    nan.update(pred, target)

    out = zero.compute()
    assert approx(out["mIoU"], 100 / 3)
    assert approx(out["pixel_acc"], 200 / 3)
    assert torch.allclose(zero.per_class_iou(), torch.tensor([50.0, 50.0, 0.0], dtype=torch.float64))

    assert approx(nan.compute()["mIoU"], 50.0)
    per_class = nan.per_class_iou()
    assert torch.allclose(per_class[:2], torch.tensor([50.0, 50.0], dtype=torch.float64))
    assert torch.isnan(per_class[2])


def test_segmentation_accumulates_over_split_not_per_image() -> None:
    metric = SegmentationMetric(2)
    metric.update(torch.tensor([[[0, 0, 0, 0]]]), torch.tensor([[[0, 0, 0, 1]]]))
    metric.update(torch.tensor([[[1, 1]]]), torch.tensor([[[1, 1]]]))
    # split totals: class 0 TP 3 FP 1 -> 3/4; class 1 TP 2 FN 1 -> 2/3.
    # per-image averaging would give ((3/4 + 0) / 2 + (0 + 1) / 2) / 2 = 43.75.
    assert approx(metric.compute()["mIoU"], 100 * (3 / 4 + 2 / 3) / 2)
    assert approx(metric.compute()["pixel_acc"], 100 * 5 / 6)


def test_segmentation_out_of_range_prediction_is_wrong_not_false_positive() -> None:
    metric = SegmentationMetric(2, absent_class_policy="nan")
    metric.update(torch.tensor([[0, 7]]), torch.tensor([[0, 0]]))
    # class 0: TP 1, FN 1 -> 1/2; class 1 never predicted nor labelled -> excluded.
    assert approx(metric.compute()["mIoU"], 50.0)
    assert approx(metric.compute()["pixel_acc"], 50.0)
    other = SegmentationMetric(2)
    other.update(torch.tensor([[-1, 9]]), torch.tensor([[0, 1]]))
    assert approx(other.compute()["mIoU"], 0.0)


def test_segmentation_rejects_bad_target_values() -> None:
    metric = SegmentationMetric(3)
    with pytest.raises(ValueError, match="7"):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="-1"):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[-1, IGN]]))
    with pytest.raises(ValueError, match="absent_class_policy"):
        SegmentationMetric(3, absent_class_policy="skip")  # type: ignore[arg-type]


# ---------------------------------------------------------------- saliency


def test_saliency_threshold_is_inclusive_and_ignores_255() -> None:
    # >= 0.5: predicted salient 0.6 (gt 1), 0.5 (gt 1), 0.9 (gt 0); the 0.7 pixel is ignored.
    # TP 2, FP 1, FN 0 -> P 2/3, R 1 -> F = 1.3 * 2/3 / (0.3 * 2/3 + 1).
    metric = SaliencyMetric(thresholds=[0.5])
    metric.update(torch.tensor([[0.2, 0.6, 0.5, 0.9, 0.7]]), torch.tensor([[0, 1, 1, 0, IGN]]))
    assert approx(metric.compute()["maxF"], 100 * 1.3 * (2 / 3) / (0.3 * 2 / 3 + 1))


def test_saliency_default_thresholds() -> None:
    metric = SaliencyMetric()
    expected = torch.tensor([0.05 * k for k in range(1, 20)], dtype=torch.float32)
    assert torch.allclose(metric.thresholds, expected)


def test_saliency_accumulates_over_split_not_per_image() -> None:
    metric = SaliencyMetric(thresholds=[0.5])
    metric.update(torch.tensor([[0.9, 0.9, 0.9, 0.9]]), torch.tensor([[1, 0, 0, 0]]))
    metric.update(torch.tensor([[0.9, 0.1]]), torch.tensor([[1, 1]]))
    # totals TP 2, FP 3, FN 1 -> P 0.4, R 2/3 (the mean of per-image F would be 55.7).
    p, r = 0.4, 2 / 3
    assert approx(metric.compute()["maxF"], 100 * 1.3 * p * r / (0.3 * p + r))


def test_saliency_legacy_sigmoid_changes_the_score() -> None:
    pred = torch.tensor([[0.3, 0.4]])
    target = torch.tensor([[0, 1]])
    plain = SaliencyMetric()
    legacy = SaliencyMetric(legacy_sigmoid=True)
    plain.update(pred, target)
    legacy.update(pred, target)
    # plain: t = 0.35 or 0.40 separates the two pixels -> 100.
    assert approx(plain.compute()["maxF"], 100.0)
    # legacy: sigmoid gives 0.574 and 0.599; no threshold of the grid separates them, the
    # best is "both salient": P 0.5, R 1.
    assert approx(legacy.compute()["maxF"], 100 * 1.3 * 0.5 / (0.3 * 0.5 + 1))


def test_saliency_rejects_non_binary_target() -> None:
    with pytest.raises(ValueError, match="2"):
        SaliencyMetric().update(torch.tensor([[0.3, 0.4]]), torch.tensor([[0, 2]]))


# ---------------------------------------------------------------- normals


def _normals_case() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 2, 4) maps: valid angles 0, 20, 90, 180, 0 plus three excluded pixels."""
    up = [0.0, 0.0, 1.0]
    rad = math.radians(20)
    pairs = [
        (up, up),  # 0
        ([math.sin(rad), 0.0, math.cos(rad)], up),  # 20
        ([1.0, 0.0, 0.0], up),  # 90
        ([0.0, 0.0, -1.0], up),  # 180
        ([0.0, 0.0, 5.0], up),  # unnormalised prediction, 0
        ([1.0, 0.0, 0.0], [IGN, IGN, IGN]),  # ignored
        ([1.0, 0.0, 0.0], [0.0, IGN, 1.0]),  # one ignored channel
        ([1.0, 0.0, 0.0], [0.0, 0.0, 0.0]),  # invalid (zero) normal
    ]
    pred = torch.tensor([p for p, _ in pairs]).T.reshape(1, 3, 2, 4)
    target = torch.tensor([g for _, g in pairs]).T.reshape(1, 3, 2, 4)
    return pred, target


def test_normals_known_angles() -> None:
    metric = NormalsMetric()
    metric.update(*_normals_case())
    out = metric.compute()
    assert approx(out["mean"], (0 + 20 + 90 + 180 + 0) / 5, tol=1e-4)
    assert approx(out["rmse"], math.sqrt((20**2 + 90**2 + 180**2) / 5), tol=1e-4)
    assert abs(float(out["median"]) - 20.0) <= 0.01 + 1e-6
    assert approx(out["11.25"], 40.0)
    assert approx(out["22.5"], 60.0)
    assert approx(out["30"], 60.0)


def test_normals_median_interpolates_inside_the_bin() -> None:
    # angles 0, 20.5 x2, 60.5 x4 with 1-degree bins: the middle rank 3.5 falls in bin 60,
    # which holds 4 angles after 3 smaller ones -> 60 + (3.5 - 3) / 4.
    degrees = torch.tensor([0.0, 20.5, 20.5, 60.5, 60.5, 60.5, 60.5])
    rad = torch.deg2rad(degrees)
    pred = torch.stack([rad.sin(), torch.zeros_like(rad), rad.cos()]).reshape(1, 3, 1, 7)
    target = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand(1, 3, 1, 7)
    metric = NormalsMetric(bins_per_degree=1)
    metric.update(pred, target)
    assert approx(metric.compute()["median"], 60.125, tol=1e-9)


def test_normals_median_matches_exact_median_to_bin_width() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 15, 17, generator=gen)
    target = torch.nn.functional.normalize(torch.randn(2, 3, 15, 17, generator=gen), dim=1)
    metric = NormalsMetric(bins_per_degree=10)
    metric.update(pred, target)
    cos = (torch.nn.functional.normalize(pred, dim=1) * target).sum(1).clamp(-1, 1)
    angles = torch.rad2deg(torch.acos(cos.double())).flatten()
    out = metric.compute()
    assert abs(float(out["median"]) - float(angles.median())) <= 0.1
    assert approx(out["mean"], float(angles.mean()), tol=1e-4)


def test_normals_accumulates_over_split_not_per_image() -> None:
    up = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1)
    side = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    metric = NormalsMetric()
    metric.update(side, up)  # one pixel at 90 degrees
    metric.update(up.expand(1, 3, 1, 3), up.expand(1, 3, 1, 3))  # three pixels at 0
    # split mean 90 / 4; the mean of per-image means would be 45.
    assert approx(metric.compute()["mean"], 22.5, tol=1e-5)


# ---------------------------------------------------------------- depth


def test_depth_invalid_and_ignored_pixels() -> None:
    metric = DepthMetric()
    pred = torch.tensor([2.0, 1.0, 3.0, 5.0]).reshape(1, 1, 1, 4)
    target = torch.tensor([1.0, 2.0, 0.0, IGN]).reshape(1, 1, 1, 4)
    metric.update(pred, target)
    out = metric.compute()
    assert approx(out["rmse"], 1.0)
    assert approx(out["abs_err"], 1.0)
    assert approx(out["abs_rel"], (1 / 1 + 1 / 2) / 2)
    assert approx(out["log_rmse"], math.log(2))


def test_depth_accumulates_over_split_not_per_image() -> None:
    metric = DepthMetric()
    metric.update(torch.full((1, 1, 1, 1), 4.0), torch.full((1, 1, 1, 1), 1.0))
    metric.update(torch.full((1, 1, 1, 2), 2.0), torch.full((1, 1, 1, 2), 2.0))
    out = metric.compute()
    # squared errors 9, 0, 0 -> sqrt(3); per-image RMSEs would average to 1.5.
    assert approx(out["rmse"], math.sqrt(3.0))
    assert approx(out["abs_err"], 1.0)
    assert approx(out["abs_rel"], 1.0)


def test_depth_log_clamps_non_positive_predictions() -> None:
    metric = DepthMetric()
    metric.update(torch.tensor([0.0, -1.0]).reshape(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert approx(metric.compute()["log_rmse"], -math.log(1e-9), tol=1e-6)


# ---------------------------------------------------------------- boundary


def _line(col: int, size: int = 20, value: float = 1.0, rows: int = 20) -> torch.Tensor:
    x = torch.zeros(1, 1, size, size)
    x[..., :rows, col] = value
    return x


@pytest.mark.parametrize(("shift", "tolerance", "expected"), [(0, 2, 100.0), (1, 2, 100.0), (5, 2, 0.0), (1, 0, 0.0)])
def test_boundary_tolerance(shift: int, tolerance: int, expected: float) -> None:
    metric = BoundaryFMetric(tolerance=tolerance)
    metric.update(_line(10 + shift, value=0.9), _line(10))
    assert approx(metric.compute()["F_tol"], expected)


def test_boundary_ignored_pixels_count_on_neither_side() -> None:
    target = _line(10)
    pred = _line(10, value=0.9) + _line(18, value=0.9)
    plain = BoundaryFMetric()
    plain.update(pred, target)
    # spurious line: P 1/2, R 1 -> F 2/3.
    assert approx(plain.compute()["F_tol"], 100 * 2 / 3)

    target[..., 18] = IGN
    masked = BoundaryFMetric()
    masked.update(pred, target)
    assert approx(masked.compute()["F_tol"], 100.0)

    # a prediction only on ignored pixels next to the GT neither counts nor recalls the GT.
    target = _line(10)
    target[..., 11] = IGN
    hidden = BoundaryFMetric()
    hidden.update(_line(11, value=0.9), target)
    assert approx(hidden.compute()["F_tol"], 0.0)

    # the valid half line (rows 0-9) recalls GT rows 0-11 only: P 1, R 12/20 -> F 0.75;
    # the ignored column 11 next to the whole GT line must not recall the rest.
    partial = BoundaryFMetric()
    partial.update(_line(10, value=0.9, rows=10) + _line(11, value=0.9), target)
    assert approx(partial.compute()["F_tol"], 75.0)


def test_boundary_accumulates_over_split_not_per_image() -> None:
    metric = BoundaryFMetric()
    metric.update(_line(10, value=0.8), _line(10))  # perfect image
    metric.update(_line(16, value=0.9), _line(5, rows=10))  # 20 false edge pixels, 10 missed GT pixels
    # best threshold (< 0.8): P 20/40, R 20/30; the mean of per-image F would be 50.
    p, r = 0.5, 2 / 3
    assert approx(metric.compute()["F_tol"], 100 * 2 * p * r / (p + r))


def test_boundary_thresholds_are_interior() -> None:
    metric = BoundaryFMetric()
    assert metric.thresholds.numel() == 99
    assert approx(metric.thresholds[0], 0.01) and approx(metric.thresholds[-1], 0.99)


# ---------------------------------------------------------------- attributes

ATTR_PRED = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.3, 0.5], [0.1, 0.6]])
ATTR_TARGET = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])


def test_attributes_hand_computed_confusion() -> None:
    metric = AttributeMetric(2)
    metric.update(ATTR_PRED[:2], ATTR_TARGET[:2])
    metric.update(ATTR_PRED[2:], ATTR_TARGET[2:])
    # attribute 0: TP 1 FP 1 FN 1 TN 1; attribute 1 (0.5 counts as present): TP 2 FP 1 FN 0 TN 1.
    per = metric.per_attribute()
    assert torch.allclose(per["precision"], torch.tensor([50.0, 200 / 3], dtype=torch.float64))
    assert torch.allclose(per["recall"], torch.tensor([50.0, 100.0], dtype=torch.float64))
    assert torch.allclose(per["f1"], torch.tensor([50.0, 80.0], dtype=torch.float64))
    assert torch.allclose(per["accuracy"], torch.tensor([50.0, 75.0], dtype=torch.float64))
    out = metric.compute()
    assert approx(out["precision"], (50.0 + 200 / 3) / 2)
    assert approx(out["recall"], 75.0)
    assert approx(out["f1"], 65.0)
    assert approx(out["accuracy"], 62.5)


def test_attributes_undefined_scores_are_zero() -> None:
    metric = AttributeMetric(1)
    metric.update(torch.tensor([[0.1], [0.2]]), torch.tensor([[0.0], [0.0]]))
    out = metric.compute()
    assert approx(out["precision"], 0.0) and approx(out["recall"], 0.0) and approx(out["f1"], 0.0)
    assert approx(out["accuracy"], 100.0)


def test_attributes_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="0.5"):
        AttributeMetric(2).update(ATTR_PRED, ATTR_TARGET * 0.5)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        AttributeMetric(3).update(ATTR_PRED, ATTR_TARGET)


# ---------------------------------------------------------------- reset / merge (distributed sum)

CASES: dict[str, tuple[Callable[[], Metric], tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "segmentation": (
        lambda: SegmentationMetric(3),
        (torch.tensor([[[0, 1], [2, 2]]]), torch.tensor([[[0, 0], [2, IGN]]])),
        (torch.tensor([[[1, 1, 1]]]), torch.tensor([[[1, 2, 0]]])),
    ),
    "saliency": (
        SaliencyMetric,
        (torch.tensor([[0.2, 0.7, 0.9]]), torch.tensor([[0, 1, 0]])),
        (torch.tensor([[0.6, 0.1]]), torch.tensor([[1, 1]])),
    ),
    "normals": (
        NormalsMetric,
        _normals_case(),
        (torch.ones(1, 3, 1, 2), torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]], [[1.0, 0.0]]]])),
    ),
    "depth": (
        DepthMetric,
        (torch.full((1, 1, 1, 2), 3.0), torch.tensor([[[[1.0, 2.0]]]])),
        (torch.full((1, 1, 1, 3), 1.0), torch.tensor([[[[2.0, 0.0, 4.0]]]])),
    ),
    "boundary": (BoundaryFMetric, (_line(10, value=0.7), _line(12)), (_line(3, value=0.4), _line(3, rows=5))),
    "attributes": (lambda: AttributeMetric(2), (ATTR_PRED[:2], ATTR_TARGET[:2]), (ATTR_PRED[2:], ATTR_TARGET[2:])),
}


def _results(metric: Metric) -> dict[str, float]:
    return {k: float(v) for k, v in metric.compute().items()}


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-9) for k in a)


@pytest.mark.parametrize("name", list(CASES))
def test_reset_restarts_accumulation(name: str) -> None:
    factory, first, second = CASES[name]
    metric = factory()
    metric.update(*first)
    before = _results(metric)
    metric.reset()
    metric.update(*second)
    fresh = factory()
    fresh.update(*second)
    assert _same(_results(metric), _results(fresh))
    assert not _same(before, _results(fresh))


@pytest.mark.parametrize("name", list(CASES))
def test_merging_states_equals_one_pass(name: str) -> None:
    factory, first, second = CASES[name]
    left, right, both = factory(), factory(), factory()
    left.update(*first)
    right.update(*second)
    both.update(*first)
    both.update(*second)
    left.merge_state(right)
    assert _same(_results(left), _results(both))


# ---------------------------------------------------------------- Delta_m

RESULTS = {"semseg": {"mIoU": 44.0, "pixel_acc": 70.0}, "depth": {"rmse": 0.55, "abs_rel": 0.2}}
REFERENCE = {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5, "abs_rel": 0.25}}
DIRECTIONS = {"semseg": {"mIoU": True}, "depth": {"rmse": False, "abs_rel": False}}


def test_delta_m_mixed_directions() -> None:
    # semseg +10%; depth mean(-10%, +20%) = +5%; Delta_m = (10 + 5) / 2.
    assert approx(delta_m(RESULTS, REFERENCE, DIRECTIONS), 7.5)


def test_delta_m_missing_entries_are_named() -> None:
    with pytest.raises(KeyError, match="'depth'.*results"):
        delta_m({"semseg": RESULTS["semseg"]}, REFERENCE, DIRECTIONS)
    with pytest.raises(KeyError, match="'abs_rel'.*'depth'.*reference"):
        delta_m(RESULTS, {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5}}, DIRECTIONS)
    with pytest.raises(ValueError, match="depth/rmse"):
        delta_m(RESULTS, {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.0, "abs_rel": 0.25}}, DIRECTIONS)


def test_load_reference(tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "ref.json"
    good.write_text(json.dumps(REFERENCE))
    assert load_reference(good) == REFERENCE

    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_reference(tmp_path / "missing.json")
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_reference(bad_json)
    bad_value = tmp_path / "text.json"
    bad_value.write_text(json.dumps({"depth": {"rmse": "0.5"}}))
    with pytest.raises(ValueError, match="text.json.*depth/rmse"):
        load_reference(bad_value)
    flag = tmp_path / "flag.json"
    flag.write_text(json.dumps({"depth": {"rmse": True}}))
    with pytest.raises(ValueError, match="flag.json"):
        load_reference(flag)
