"""Benchmark of the SEISM-equivalent boundary evaluation on synthetic NYUD-size maps.

Generates random but structured pairs (ground truth: boundaries of a random Voronoi
partition; prediction: those boundaries displaced by a smooth random field, partly dropped,
blurred, with texture clutter and noise, saved as 8-bit probabilities) and times

1. ``BoundaryEvaluator.evaluate`` in one process,
2. the same with ``--workers`` processes (results must be identical),
3. optionally, the BSDS ``correspondPixels`` matcher of the GPL package ``pyedgeeval`` on the
   same thinned maps, for a subset of images and thresholds (it takes seconds per call),
   reporting the largest difference of matched-pixel counts against ours.

Run: ``python benchmarks/boundary_eval.py [--images 100] [--workers 2] [--ref-images 5]``
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from polytask.evaluation import BoundaryEvaluator, segmentation_boundaries, seism_nms, thin
from polytask.evaluation.correspondence import PixelMatcher, match_radius
from polytask.evaluation.evaluate import boundary_protocols


def synthetic_pair(rng: np.random.Generator, height: int = 425, width: int = 560) -> tuple[np.ndarray, np.ndarray]:
    """One ``(pred, gt)`` pair: ``(H, W)`` float32 multiples of 1/255 and ``(H, W)`` bool."""
    n_regions = int(rng.integers(8, 40))
    seeds = rng.random((n_regions, 2)) * (height, width)
    stretch = rng.uniform(0.5, 2.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    tree = cKDTree(seeds * (1.0, stretch))
    _, labels = tree.query(np.stack((yy.ravel(), xx.ravel() * stretch), axis=1))
    gt = segmentation_boundaries(labels.reshape(height, width))

    amplitude = rng.uniform(0.5, 3.0)
    field = [ndimage.gaussian_filter(rng.standard_normal((height, width)), 20) for _ in range(2)]
    field = [f / (np.abs(f).max() + 1e-9) * amplitude for f in field]
    displaced = ndimage.map_coordinates(gt.astype(np.float64), [yy + field[0], xx + field[1]], order=1)
    keep = ndimage.zoom(rng.random((height // 20 + 1, width // 20 + 1)), 20, order=0)[:height, :width]
    keep = keep > rng.uniform(0.1, 0.4)
    texture = ndimage.gaussian_filter(rng.random((height, width)), 2.0)
    texture_edges = ndimage.gaussian_gradient_magnitude(texture, 1.0)
    clutter = texture_edges / texture_edges.max() * ndimage.zoom(rng.random((6, 8)), (height / 6, width / 8), order=1)
    strength = ndimage.gaussian_filter(displaced * keep + 0.5 * clutter, rng.uniform(0.8, 2.5))
    strength /= strength.max() + 1e-9
    logits = 9.0 * strength - 3.5 + 0.7 * rng.standard_normal((height, width))
    prob = 1.0 / (1.0 + np.exp(-logits))
    pred = np.floor(prob * 255).astype(np.float32) / np.float32(255)
    return pred, gt


def _cpu_seconds() -> float:
    """CPU time of this process and of its terminated children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def compare_with_pyedgeeval(
    pairs: list[tuple[np.ndarray, np.ndarray]], thresholds: tuple[float, ...], max_dist: float
) -> tuple[float, float, int, float, int]:
    """Time pyedgeeval's matcher on our thinned maps; largest count difference against ours.

    Returns:
        ``(wall seconds per call, CPU seconds per call, calls, largest |difference| / (pred + GT
        pixels), largest |difference|)``; ours is never below pyedgeeval's (maximum matching).
    """
    from pyEdgeEval._lib import correspond_pixels

    seconds, cpu, calls, worst_rel, worst_abs = 0.0, 0.0, 0, 0.0, 0
    for pred, gt in pairs:
        edges = seism_nms(pred).astype(np.float64)
        gt_thin = thin(gt)
        matcher = PixelMatcher(edges > min(thresholds), gt_thin, match_radius(gt.shape, max_dist))
        for threshold in thresholds:
            pred_thin = thin(edges > threshold)
            ours = matcher.count(pred_thin)
            start, start_cpu = time.perf_counter(), time.process_time()
            match_pred, _, _, _ = correspond_pixels(pred_thin.astype(np.float64), gt_thin.astype(np.float64), max_dist)
            seconds += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            calls += 1
            diff = abs(int(np.count_nonzero(match_pred)) - ours)
            worst_abs = max(worst_abs, diff)
            worst_rel = max(worst_rel, diff / max(int(pred_thin.sum() + gt_thin.sum()), 1))
    return seconds / max(calls, 1), cpu / max(calls, 1), calls, worst_rel, worst_abs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dataset", choices=sorted(boundary_protocols()), default="nyud", help="whose SEISM tolerance to use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ref-images", type=int, default=5, help="images matched with pyedgeeval (0: skip)")
    parser.add_argument("--ref-every", type=int, default=10, help="use every n-th threshold for pyedgeeval")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    pairs = [synthetic_pair(rng) for _ in range(args.images)]
    max_dist = boundary_protocols()[args.dataset].max_dist

    single = BoundaryEvaluator(max_dist)
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    res_single = single.evaluate(pairs)
    t_single, c_single = time.perf_counter() - start, _cpu_seconds() - start_cpu

    parallel = BoundaryEvaluator(max_dist, workers=args.workers)
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    res_parallel = parallel.evaluate(pairs)
    t_parallel, c_parallel = time.perf_counter() - start, _cpu_seconds() - start_cpu
    identical = np.array_equal(res_single.f, res_parallel.f) and res_single.ois_f == res_parallel.ois_f

    n = len(pairs)
    print(f"{n} images {pairs[0][0].shape}, max_dist {max_dist}, {len(single.thresholds)} thresholds, {os.cpu_count()} CPUs")
    print(f"odsF {res_single.ods_f:.4f} (t={res_single.ods_threshold}) oisF {res_single.ois_f:.4f} AP {res_single.ap:.4f}")
    print(f"ours, 1 process:   wall {t_single:7.1f} s ({t_single / n:.2f} s/image), CPU {c_single:7.1f} s ({c_single / n:.2f} s/image)")
    print(
        f"ours, {args.workers} processes: wall {t_parallel:7.1f} s ({t_parallel / n:.2f} s/image), "
        f"CPU {c_parallel:7.1f} s, identical results: {identical}"
    )

    if args.ref_images > 0:
        try:
            import pyEdgeEval  # noqa: F401
        except ImportError:
            print("pyedgeeval not installed: reference matcher skipped")
            return
        ref_thresholds = single.thresholds[:: args.ref_every]
        per_call, cpu_call, calls, worst_rel, worst_abs = compare_with_pyedgeeval(
            pairs[: args.ref_images], ref_thresholds, max_dist
        )
        n_thr = len(single.thresholds)
        print(
            f"pyedgeeval matcher: wall {per_call:.2f} s, CPU {cpu_call:.2f} s per image and threshold ({calls} calls); "
            f"{per_call * n_thr:.0f} s wall / {cpu_call * n_thr:.0f} s CPU per image for {n_thr} thresholds (matching only)"
        )
        print(f"largest matched-count difference vs pyedgeeval: {worst_abs} px ({100 * worst_rel:.3f}% of pred + GT pixels)")


if __name__ == "__main__":
    main()
