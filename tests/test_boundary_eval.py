"""SEISM-equivalent boundary evaluation: NMS, thinning, correspondence, accumulation, wrappers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from polytask.evaluation import (
    MTINET_THRESHOLDS,
    SEISM_THRESHOLDS,
    BoundaryEvaluator,
    BoundaryODSMetric,
    correspond_pixels,
    edge_nms,
    edge_orientation,
    quantize_probabilities,
    read_prediction_png,
    segmentation_boundaries,
    seism_nms,
    thin,
)
from polytask.evaluation.boundary import BoundaryCounts, average_precision, summarize_images
from polytask.evaluation.correspondence import PixelMatcher, match_radius
from polytask.evaluation.evaluate import boundary_protocols

MAX_DIST = {name: protocol.max_dist for name, protocol in boundary_protocols().items()}
"""The SEISM tolerances the datasets declare (their datamodules' ``boundary_protocol``)."""


def _structured_pair(rng: np.random.Generator, h: int = 60, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Small structured (pred, gt): Voronoi boundaries, a displaced blurred noisy copy, 8-bit levels."""
    seeds = rng.random((6, 2)) * (h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    labels = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    gt = segmentation_boundaries(labels)
    shifted = np.roll(gt, tuple(rng.integers(-2, 3, 2)), axis=(0, 1)).astype(np.float64)
    blurred = ndimage.gaussian_filter(shifted * (rng.random((h, w)) > 0.1), 1.2)
    logits = 12 * blurred / blurred.max() - 3 + 0.8 * rng.standard_normal((h, w))
    return quantize_probabilities(1 / (1 + np.exp(-logits))), gt


# ---------------------------------------------------------------- thinning


def test_thin_matches_skimage_on_random_maps() -> None:
    skimage_morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(0)
    for density in (0.05, 0.3, 0.6):
        field = ndimage.gaussian_filter(rng.random((90, 110)), 1.5)
        mask = field > np.quantile(field, 1 - density)
        np.testing.assert_array_equal(thin(mask), skimage_morphology.thin(mask))


def test_thin_reduces_thick_bar_and_keeps_lines() -> None:
    bar = np.zeros((20, 30), dtype=bool)
    bar[8:11, 5:25] = True
    thinned = thin(bar)
    assert thinned[:, 8:22].sum(axis=0).tolist() == [1] * 14
    line = np.zeros((20, 30), dtype=bool)
    line[4, 3:27] = True
    np.testing.assert_array_equal(thin(line), line)


# ---------------------------------------------------------------- correspondence


def _line_maps(shift: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((30, 40), dtype=bool)
    gt[12, 5:35] = True
    pred = np.roll(gt, shift, axis=(0, 1))
    return pred, gt


def test_correspondence_radius_is_inclusive() -> None:
    # a 30x40 image has a diagonal of 50, so max_dist 0.1 gives a radius of exactly 5 pixels
    assert match_radius((30, 40), 0.1) == pytest.approx(5.0)
    gt = np.zeros((30, 40), dtype=bool)
    gt[15, 20] = True
    for (dy, dx), expected in (((5, 0), 1), ((-3, 4), 1), ((0, -5), 1), ((4, 4), 0), ((0, 6), 0)):
        pred = np.zeros_like(gt)
        pred[15 + dy, 20 + dx] = True
        pm, gm = correspond_pixels(pred, gt, 0.1)
        assert pm.sum() == gm.sum() == expected, (dy, dx)


def test_correspondence_line_within_and_beyond_tolerance() -> None:
    pred, gt = _line_maps((2, 0))
    pm, gm = correspond_pixels(pred, gt, 0.1)
    np.testing.assert_array_equal(pm, pred)
    np.testing.assert_array_equal(gm, gt)
    pred, gt = _line_maps((8, 0))
    pm, gm = correspond_pixels(pred, gt, 0.1)
    assert not pm.any() and not gm.any()


def test_correspondence_is_one_to_one() -> None:
    gt = np.zeros((30, 40), dtype=bool)
    gt[15, 20] = True
    pred = np.zeros_like(gt)
    pred[14, 20] = pred[16, 20] = True
    pm, gm = correspond_pixels(pred, gt, 0.1)
    assert pm.sum() == 1 and gm.sum() == 1


def test_matching_is_maximum_not_greedy() -> None:
    # p0 reaches g0 and g1, p1 only g0: a greedy nearest match p0-g0 would leave p1 unmatched
    gt = np.zeros((30, 40), dtype=bool)
    pred = np.zeros_like(gt)
    gt[10, 10] = gt[10, 15] = True
    pred[10, 11] = True  # 1 from g0, 4 from g1
    pred[10, 6] = True  # 4 from g0, 9 from g1
    matcher = PixelMatcher(pred, gt, 4.5)
    assert matcher.count(pred) == 2


# ---------------------------------------------------------------- NMS


def test_nms_thins_blurred_ridge_to_its_centre() -> None:
    h, w = 50, 60
    cols = np.arange(w)
    vertical = np.exp(-0.5 * ((cols - 31) / 2.0) ** 2)[None].repeat(h, axis=0)
    out = seism_nms(quantize_probabilities(vertical))
    interior = out[6:-6, 6:-6] > 0
    assert interior.any(axis=1).all()
    assert set(np.flatnonzero(interior.any(axis=0)) + 6) == {31}

    yy, xx = np.mgrid[0:h, 0:w]
    diagonal = np.exp(-0.5 * ((xx - yy - 5) / (2.0 * np.sqrt(2))) ** 2 * 2)
    out = seism_nms(quantize_probabilities(diagonal))
    ys, xs = np.nonzero(out[6:-6, 6:-6] > 0)
    np.testing.assert_array_equal(xs - ys, np.full(xs.size, 5))


def test_nms_border_fade_and_plateau() -> None:
    flat = np.full((20, 24), 0.5, dtype=np.float32)
    out = edge_nms(flat, edge_orientation(flat))
    fade = np.array([0, 0.2, 0.4, 0.6, 0.8], dtype=np.float32)
    np.testing.assert_allclose(out[10, :5], 0.5 * fade, rtol=1e-6)
    np.testing.assert_allclose(out[10, -5:], 0.5 * fade[::-1], rtol=1e-6)
    np.testing.assert_allclose(out[:5, 12], 0.5 * fade, rtol=1e-6)
    assert out[5:-5, 5:-5].min() == 0.5


def test_nms_matches_dollar_reference_on_same_orientation() -> None:
    lib = pytest.importorskip("pyEdgeEval._lib")
    rng = np.random.default_rng(3)
    for _ in range(3):
        pred, _ = _structured_pair(rng, 90, 120)
        orientation = edge_orientation(pred)
        ours = edge_nms(pred, orientation)
        ref = lib.nms(pred.astype(np.float64), orientation.astype(np.float64), 1, 5, 1.01)
        # the reference runs in double precision; float32 rounding may flip a rare near-tie
        assert ((ours > 0) != (ref > 0)).sum() <= 2
        np.testing.assert_allclose(ours, ref, atol=1e-6)


# ---------------------------------------------------------------- thresholds and IO


def test_thresholds_are_strict_and_compare_exact_values() -> None:
    pred = np.zeros((30, 40), dtype=np.float32)
    pred[15, 20] = 0.5
    pred[10, 10] = np.float32(51) / np.float32(255)  # single-precision 0.2 lies above the double 0.2
    gt = np.zeros((30, 40), dtype=bool)
    counts = BoundaryEvaluator(0.05, thresholds=[0.19, 0.2, 0.49, 0.5]).evaluate_image(pred, gt)
    assert counts.pred.tolist() == [2, 2, 1, 0]
    assert SEISM_THRESHOLDS[:3] == (0.001, 0.01, 0.02) and SEISM_THRESHOLDS[-2:] == (0.99, 0.999)
    assert len(SEISM_THRESHOLDS) == 101


def test_mtinet_variant_skips_nms_and_includes_ties() -> None:
    pred = np.zeros((30, 40), dtype=np.float32)
    pred[14:17, 8:32] = np.array([0.3, 0.5, 0.3], dtype=np.float32)[:, None]
    gt = np.zeros((30, 40), dtype=bool)
    gt[15, 8:32] = True
    mtinet = BoundaryEvaluator(0.05, thresholds=MTINET_THRESHOLDS, nms=False, strict=False)
    counts = mtinet.evaluate_image(pred, gt)
    at = {t: k for k, t in enumerate(MTINET_THRESHOLDS)}
    # >= 0.3: the 3x24 bar thins to a 22-pixel line; >= 0.5 keeps the 24-pixel centre row
    assert counts.pred[at[0.3]] == 22 and counts.pred[at[0.5]] == 24
    assert counts.matched[at[0.5]] == 24 and counts.pred[at[0.51]] == 0
    # the default protocol suppresses the flanks first and needs a value above 0.5
    default = BoundaryEvaluator(0.05, thresholds=[0.3, 0.5]).evaluate_image(pred, gt)
    assert default.pred.tolist() == [24, 0]


def test_read_prediction_png(tmp_path) -> None:
    values = np.array([[0, 1, 51], [128, 254, 255]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "p.png")
    out = read_prediction_png(tmp_path / "p.png")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(quantize_probabilities(np.array([0.999, 0.2, 1.0])), np.float32([254, 51, 255]) / 255)


def test_segmentation_boundaries_follow_seg2bmap() -> None:
    labels = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    expected = np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(segmentation_boundaries(labels), expected)


def test_label_ground_truth_as_seism_reads_nyud_edges(tmp_path) -> None:
    # SEISM (InvPT's set-up) reads NYUD edge/<id>.png as a label image: seg2bmap, then thin
    rng = np.random.default_rng(4)
    pred, gt = _structured_pair(rng)
    edge_png = gt.astype(np.uint8) * 255
    Image.fromarray(edge_png).save(tmp_path / "edge.png")
    as_labels = BoundaryEvaluator(MAX_DIST["nyud"], gt_labels=True)
    from_path = as_labels.evaluate_counts([(pred, tmp_path / "edge.png")])[0]
    direct = BoundaryEvaluator(MAX_DIST["nyud"]).evaluate_image(pred, segmentation_boundaries(edge_png))
    np.testing.assert_array_equal(from_path.matched, direct.matched)
    np.testing.assert_array_equal(from_path.gt, direct.gt)
    # a boundary-map reading of the same file scores the (thinned) lines themselves
    as_boundaries = BoundaryEvaluator(MAX_DIST["nyud"]).evaluate_counts([(pred, tmp_path / "edge.png")])[0]
    assert as_boundaries.gt[0] == thin(gt).sum()


# ---------------------------------------------------------------- accumulation and scores


def _hand_checked_set() -> list[tuple[np.ndarray, np.ndarray]]:
    """Two 40x60 images made of straight segments (kept intact by NMS and thinning).

    Image 1: GT row 10, cols 10..49 (40 px); prediction 2 rows below at 0.4.
    Image 2: GT col 20, rows 8..31 (24 px); prediction one column right on rows 8..19 at 0.6
    (12 px) and a spurious segment at 0.3 on row 30, cols 35..54 (20 px, out of reach).
    """
    gt1 = np.zeros((40, 60), dtype=bool)
    gt1[10, 10:50] = True
    pred1 = np.zeros((40, 60), dtype=np.float32)
    pred1[12, 10:50] = 0.4
    gt2 = np.zeros((40, 60), dtype=bool)
    gt2[8:32, 20] = True
    pred2 = np.zeros((40, 60), dtype=np.float32)
    pred2[8:20, 21] = 0.6
    pred2[30, 35:55] = 0.3
    return [(pred1, gt1), (pred2, gt2)]


def test_hand_checked_ods_ois_ap() -> None:
    # radius 0.05 * sqrt(40^2 + 60^2) = 3.6 px
    evaluator = BoundaryEvaluator(0.05, thresholds=[0.25, 0.5, 0.75])
    pairs = _hand_checked_set()
    counts = [evaluator.evaluate_image(p, g) for p, g in pairs]
    assert [c.matched.tolist() for c in counts] == [[40, 0, 0], [12, 12, 0]]
    assert [c.pred.tolist() for c in counts] == [[40, 0, 0], [32, 12, 0]]
    assert [c.gt.tolist() for c in counts] == [[40, 40, 40], [24, 24, 24]]

    res = evaluator.evaluate(pairs)
    # totals: matched [52, 12, 0], pred [72, 12, 0], gt 64 -> F = 2 * 52 / (72 + 64) at 0.25
    assert res.ods_f == pytest.approx(104 / 136)
    assert res.ods_threshold == 0.25
    assert (res.ods_precision, res.ods_recall) == pytest.approx((52 / 72, 52 / 64))
    # image 1 is best at 0.25 (F 1), image 2 at 0.5 (F 2/3): summed (52, 52, 64)
    assert res.ois_f == pytest.approx(104 / 116)
    # curve (R, P): (0, 1) (no prediction), (0.1875, 1), (0.8125, 52/72); grid 0..0.81:
    # 19 points at P = 1, then P = 1 - 4/9 (R - 0.1875) on 0.19..0.81 summing to 54.25
    assert res.ap == pytest.approx(0.7325)
    assert res.n_images == 2

    # split-level accumulation differs from averaging per-image F at the same threshold
    per_image_f = [2 * c.matched[0] / (c.pred[0] + c.gt[0]) for c in counts]
    assert np.mean(per_image_f) == pytest.approx((1 + 24 / 56) / 2)
    assert abs(np.mean(per_image_f) - res.f[0]) > 0.05


def test_average_precision_interpolates_on_recall_grid() -> None:
    precision = np.array([0.5, 0.8, 1.0])
    recall = np.array([0.9, 0.5, 0.1])
    assert average_precision(precision, recall) == pytest.approx(0.6275)
    # a repeated recall keeps its first occurrence in threshold order
    assert average_precision(np.array([0.5, 0.6, 0.8, 1.0]), np.array([0.9, 0.9, 0.5, 0.1])) == pytest.approx(0.6275)
    assert average_precision(np.array([1.0, 1.0]), np.array([0.3, 0.3])) == 0.0


def test_ois_picks_first_best_threshold_after_rounding() -> None:
    counts = [
        BoundaryCounts(matched=np.array([3, 3]), pred=np.array([4, 4]), gt=np.array([4, 4])),
        BoundaryCounts(matched=np.array([0, 1]), pred=np.array([5, 1]), gt=np.array([0, 0])),
    ]
    res = summarize_images((0.3, 0.6), counts)
    # image 2 has no GT: F = 0 everywhere, the first threshold is taken
    assert res.ois_f == pytest.approx(2 * 3 / (9 + 4))


# ---------------------------------------------------------------- wrappers and parallelism


def test_metric_equals_png_evaluation(tmp_path) -> None:
    rng = np.random.default_rng(7)
    max_dist = MAX_DIST["nyud"]
    samples = []
    # a padded batch of three: the metric crops every image to its non-ignored box
    pred_t = torch.rand(3, 1, 64, 88)
    target_t = torch.full((3, 1, 64, 88), 255.0)
    for i in range(3):
        _, gt = _structured_pair(rng)
        ridge = ndimage.gaussian_filter(np.roll(gt, 1, 0).astype(np.float32), 1.0)
        probs = np.clip(0.3 * rng.random((60, 80)).astype(np.float32) ** 3 + 2 * ridge, 0, 1)
        Image.fromarray(np.floor(probs * np.float32(255)).astype(np.uint8)).save(tmp_path / f"{i}.png")
        samples.append((tmp_path / f"{i}.png", gt))
        pred_t[i, 0, 2:62, 4:84] = torch.from_numpy(probs)
        target_t[i, 0, 2:62, 4:84] = torch.from_numpy(gt.astype(np.float32))
    for gt_labels in (False, True):
        metric = BoundaryODSMetric(max_dist, gt_labels=gt_labels)
        metric.update(pred_t, target_t)
        ref = BoundaryEvaluator(max_dist, gt_labels=gt_labels).evaluate(samples)
        got = metric.result()
        np.testing.assert_array_equal(got.f, ref.f)
        assert (got.ods_f, got.ois_f, got.ap, got.n_images) == (ref.ods_f, ref.ois_f, ref.ap, 3)
        out = metric.compute()
        assert set(out) == {"odsF", "oisF", "ap"}
        assert out["odsF"].item() == pytest.approx(100 * ref.ods_f)


def test_parallel_equals_single_process() -> None:
    rng = np.random.default_rng(11)
    pairs = [_structured_pair(rng) for _ in range(5)]
    single = BoundaryEvaluator(MAX_DIST["pascal_context"]).evaluate_counts(pairs)
    parallel = BoundaryEvaluator(MAX_DIST["pascal_context"], workers=2, chunksize=2).evaluate_counts(pairs)
    for a, b in zip(single, parallel):
        np.testing.assert_array_equal(a.matched, b.matched)
        np.testing.assert_array_equal(a.pred, b.pred)
        np.testing.assert_array_equal(a.gt, b.gt)


# ---------------------------------------------------------------- reference matcher (GPL, optional)


def _matcher_cases(rng: np.random.Generator, h: int, w: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Thinned (pred, gt) pairs: structured maps at three thresholds, and random clutter."""
    cases = []
    for _ in range(3):
        pred, gt = _structured_pair(rng, h, w)
        edges = seism_nms(pred).astype(np.float64)
        cases += [(thin(edges > t), thin(gt)) for t in (0.05, 0.3, 0.6)]
    for _ in range(2):
        cases.append((thin(rng.random((h, w)) > 0.9), thin(rng.random((h, w)) > 0.95)))
    return cases


def _bsds_assignment_optimum(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
    """Matched pairs of the exact optimum of the BSDS assignment objective.

    Pairs cost ``round(100 * distance)``, every unmatched pixel costs half of
    ``ceil(100 * 100 * radius)`` (each unmatched pair of the BSDS graph costs it once);
    solved as a full matching of prediction + mirrored GT nodes against GT + mirrored
    prediction nodes (all weights shifted by +1, which changes no optimum).
    """
    from scipy import sparse
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    radius = match_radius(gt.shape, max_dist)
    p, g = np.argwhere(pred), np.argwhere(gt)
    dist = np.sqrt(((p[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    rows, cols = np.nonzero(dist**2 <= radius * radius)
    n1, n2 = len(p), len(g)
    outlier = int(np.ceil(100 * 100 * radius))
    r = np.concatenate([rows, n1 + cols, np.arange(n1), n1 + np.arange(n2)])
    c = np.concatenate([cols, n2 + rows, n2 + np.arange(n1), np.arange(n2)])
    wgt = np.concatenate(
        [2 * np.rint(100 * dist[rows, cols]) + 1, np.ones(rows.size), np.full(n1, outlier + 1.0), np.full(n2, outlier + 1.0)]
    )
    row_ind, col_ind = min_weight_full_bipartite_matching(sparse.csr_matrix((wgt, (r, c)), shape=(n1 + n2, n1 + n2)))
    return int(((row_ind < n1) & (col_ind < n2)).sum())


def test_matching_attains_bsds_assignment_optimum() -> None:
    rng = np.random.default_rng(5)
    for pred, gt in _matcher_cases(rng, 60, 80):
        for max_dist in (MAX_DIST["pascal_context"], MAX_DIST["nyud"]):
            ours = PixelMatcher(pred, gt, match_radius(gt.shape, max_dist)).count(pred)
            assert ours == _bsds_assignment_optimum(pred, gt, max_dist)


def test_warm_started_matching_is_maximum() -> None:
    rng = np.random.default_rng(9)
    pred, gt = _structured_pair(rng, 80, 110)
    edges = seism_nms(pred).astype(np.float64)
    gt_thin = thin(gt)
    matcher = PixelMatcher(edges > 0.001, gt_thin, match_radius(gt.shape, MAX_DIST["nyud"]))
    partner = None
    for threshold in (0.9, 0.6, 0.3, 0.05, 0.5):
        pred_thin = thin(edges > threshold)
        partner = matcher.maximum_matching(pred_thin, partner)
        used = partner[partner >= 0]
        assert np.unique(used).size == used.size
        assert np.count_nonzero(partner >= 0) == matcher.count(pred_thin)


def test_matcher_agrees_with_bsds_correspond_pixels() -> None:
    lib = pytest.importorskip("pyEdgeEval._lib")
    rng = np.random.default_rng(5)
    for pred, gt in _matcher_cases(rng, 150, 200):
        for max_dist in (MAX_DIST["pascal_context"], MAX_DIST["nyud"]):
            ours = PixelMatcher(pred, gt, match_radius(gt.shape, max_dist)).count(pred)
            ref_pred, ref_gt, _, _ = lib.correspond_pixels(pred.astype(np.float64), gt.astype(np.float64), max_dist)
            ref = np.count_nonzero(ref_pred)
            assert ref == np.count_nonzero(ref_gt)
            # the BSDS solver approximates its optimum (random sparse outlier edges)
            assert ref <= ours <= ref + 0.005 * (pred.sum() + gt.sum())


def test_known_difference_long_shifted_chain() -> None:
    # a 200-pixel chain shifted by one pixel along itself, radius 1.5: matching every pair
    # adds 200 of distance, more than the BSDS cost of one unmatched pair (100 * 1.5), so
    # the BSDS optimum leaves one pair unmatched; the maximum matching keeps all of them
    h, w = 11, 220
    max_dist = 1.5 / np.hypot(h, w)
    gt = np.zeros((h, w), dtype=bool)
    gt[5, 10:210] = True
    pred = np.roll(gt, 1, axis=1)
    ours, _ = correspond_pixels(pred, gt, max_dist)
    assert ours.sum() == 200
    assert _bsds_assignment_optimum(pred, gt, max_dist) == 199
    lib = pytest.importorskip("pyEdgeEval._lib")
    ref, _, _, _ = lib.correspond_pixels(pred.astype(np.float64), gt.astype(np.float64), max_dist)
    assert np.count_nonzero(ref) < 200
