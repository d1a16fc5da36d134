"""One-to-one boundary pixel correspondence (the maps are thinned first by
:func:`polytask.ops.thinning.thin`).

- :class:`PixelMatcher` pairs the pixels of two binary maps one-to-one when they lie within a
  radius of each other and returns a maximum-cardinality matching, grown by augmenting paths
  found with Dinic's maximum flow (:func:`scipy.sparse.csgraph.maximum_flow`) from a warm
  start. (SciPy's Hopcroft-Karp, ``maximum_bipartite_matching``, is not used: its search does
  not mark dead ends and took tens of seconds on some of these dense geometric graphs.)

The BSDS matcher used by SEISM (``correspondPixels``) solves a min-cost assignment instead:
the cost is the sum of the pair distances plus ``outlier_cost * radius`` (``outlier_cost =
100``) for every pair not formed, i.e. each pair formed saves ``100 * radius``. An augmenting
path that re-pairs ``n`` prediction pixels adds one pair and at most ``n * radius`` of
distance, so it lowers that cost unless ``n > 100``. Hence in every connected group of
candidate pairs with at most 100 prediction or at most 100 ground-truth pixels the
assignment's optimum is a maximum-cardinality matching and the counts agree exactly; only a
chain of more than 100 pixels that must all be re-paired to farther partners (a long curve
shifted along itself) makes the assignment leave a pair unmatched where this module matches
it. The BSDS solver itself approximates its optimum (random sparse outlier edges), so its
counts vary between runs and fall below the optimum by a few pixels per image.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import maximum_flow


def match_radius(shape: tuple[int, int], max_dist: float) -> float:
    """Matching radius in pixels: ``max_dist`` times the image diagonal ``sqrt(H^2 + W^2)``."""
    h, w = shape
    return max_dist * math.sqrt(h * h + w * w)


def disk_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer ``(dy, dx)`` offsets with ``dy^2 + dx^2 <= radius^2``, each ``(K,)`` int64."""
    r = math.ceil(radius)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    inside = (dy * dy + dx * dx).astype(np.float64) <= radius * radius
    return dy[inside].astype(np.int64), dx[inside].astype(np.int64)


class PixelMatcher:
    """One-to-one matching of candidate pixels against a fixed ground-truth boundary map.

    The candidate pairs (a prediction pixel and a ground-truth pixel at most ``radius``
    apart) are enumerated once for all pixels of ``candidates``; :meth:`maximum_matching`
    and :meth:`count` then match any subset of them. This is how one image is scored at
    every threshold: the thinned map at a threshold never leaves the pixels above the lowest
    threshold.

    Args:
        candidates: ``(H, W)`` bool superset of every prediction map to be matched.
        gt: ``(H, W)`` bool ground-truth boundary pixels.
        radius: matching radius in pixels (inclusive).
    """

    def __init__(self, candidates: np.ndarray, gt: np.ndarray, radius: float) -> None:
        candidates = np.asarray(candidates, dtype=bool)
        gt = np.asarray(gt, dtype=bool)
        if candidates.shape != gt.shape or gt.ndim != 2:
            raise ValueError(f"candidates and gt must be equal 2-D shapes, got {candidates.shape} and {gt.shape}")
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        self.shape = gt.shape
        self.n_gt = int(gt.sum())
        h, w = gt.shape
        if self.n_gt:
            # a superset of the pixels with a GT pixel in reach; the pairs below are exact
            candidates = candidates & (ndimage.distance_transform_edt(~gt) <= radius + 1.0)
        else:
            candidates = np.zeros_like(candidates)
        self._cand_flat = np.flatnonzero(candidates)
        self._n_cand = self._cand_flat.size

        pad = math.ceil(radius)
        gt_index = np.full((h + 2 * pad, w + 2 * pad), -1, dtype=np.int64)
        self._gt_flat = np.flatnonzero(gt)
        gy, gx = np.divmod(self._gt_flat, w)
        gt_index[gy + pad, gx + pad] = np.arange(gy.size)
        cy, cx = np.divmod(self._cand_flat, w)
        dy, dx = disk_offsets(radius)
        cand_parts: list[np.ndarray] = []
        gt_parts: list[np.ndarray] = []
        for oy, ox in zip(dy, dx):
            hit = gt_index[cy + pad + oy, cx + pad + ox]
            found = np.flatnonzero(hit >= 0)
            cand_parts.append(found)
            gt_parts.append(hit[found])
        self._pair_cand = np.concatenate(cand_parts)
        self._pair_gt = np.concatenate(gt_parts)

    def maximum_matching(self, pred: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
        """A maximum one-to-one matching between ``pred`` and the ground truth.

        The matching is grown by augmenting paths (Dinic's maximum flow on the residual
        graph of ``start``) from ``start``, which is first stripped of the pairs whose
        candidate is not in ``pred``. Passing the matching of a similar map (the previous
        threshold of the same image) leaves few augmenting paths to find.

        Args:
            pred: ``(H, W)`` bool prediction pixels; pixels outside ``candidates`` are
                never matched.
            start: optional ``(n_gt,)`` matching of this matcher (from an earlier call).

        Returns:
            ``(n_gt,)`` int64: for every ground-truth pixel (in raster order) the index of
            its matched candidate, or -1.
        """
        n_gt, n_cand = self.n_gt, self._n_cand
        active = np.asarray(pred, dtype=bool).ravel()[self._cand_flat]
        if start is None:
            partner = np.full(n_gt, -1, dtype=np.int64)
        else:
            partner = np.where(start >= 0, start, -1).astype(np.int64)
            partner[(partner >= 0) & ~active[np.maximum(partner, 0)]] = -1
        keep = active[self._pair_cand]
        pair_gt, pair_cand = self._pair_gt[keep], self._pair_cand[keep]
        cand_used = np.zeros(n_cand, dtype=bool)
        cand_used[partner[partner >= 0]] = True
        if not ((partner[pair_gt] < 0).any() and (~cand_used[pair_cand]).any()):
            return partner

        # residual graph: source -> free GT -> candidate (unmatched pairs), candidate -> GT
        # (matched pairs), free candidate -> sink; nodes: GT, candidates, source, sink
        in_match = partner[pair_gt] == pair_cand
        free_gt = np.flatnonzero(partner < 0)
        free_cand = np.flatnonzero(active & ~cand_used)
        source, sink = n_gt + n_cand, n_gt + n_cand + 1
        rows = np.concatenate((np.full(free_gt.size, source), pair_gt[~in_match], n_gt + pair_cand[in_match], n_gt + free_cand))
        cols = np.concatenate((free_gt, n_gt + pair_cand[~in_match], pair_gt[in_match], np.full(free_cand.size, sink)))
        graph = sparse.csr_matrix(
            (np.ones(rows.size, dtype=np.int32), (rows, cols)), shape=(n_gt + n_cand + 2, n_gt + n_cand + 2)
        )
        result = maximum_flow(graph, source, sink, method="dinic")
        if result.flow_value == 0:
            return partner
        flow = result.flow.tocoo()
        used = flow.data > 0
        src, dst = flow.row[used], flow.col[used]
        released = (src >= n_gt) & (src < n_gt + n_cand) & (dst < n_gt)
        partner[dst[released]] = -1
        gained = (src < n_gt) & (dst >= n_gt) & (dst < n_gt + n_cand)
        partner[src[gained]] = dst[gained] - n_gt
        return partner

    def count(self, pred: np.ndarray) -> int:
        """Size of a maximum one-to-one matching between ``pred`` and the ground truth.

        Args:
            pred: ``(H, W)`` bool prediction pixels; pixels outside ``candidates`` are
                never matched.

        Returns:
            Number of matched pairs (= matched prediction pixels = matched GT pixels).
        """
        return int(np.count_nonzero(self.maximum_matching(pred) >= 0))

    def match(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Matched pixel maps of one maximum one-to-one matching.

        Args:
            pred: ``(H, W)`` bool prediction pixels; pixels outside ``candidates`` are
                never matched.

        Returns:
            ``(pred_matched, gt_matched)``, each ``(H, W)`` bool.
        """
        partner = self.maximum_matching(pred)
        matched = partner >= 0
        pred_matched = np.zeros(self.shape, dtype=bool)
        gt_matched = np.zeros(self.shape, dtype=bool)
        pred_matched.ravel()[self._cand_flat[partner[matched]]] = True
        gt_matched.ravel()[self._gt_flat[matched]] = True
        return pred_matched, gt_matched


def correspond_pixels(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Match two binary boundary maps one-to-one within ``max_dist`` x image diagonal.

    Args:
        pred: ``(H, W)`` bool prediction boundary pixels.
        gt: ``(H, W)`` bool ground-truth boundary pixels.
        max_dist: tolerance as a fraction of the image diagonal.

    Returns:
        ``(pred_matched, gt_matched)``, each ``(H, W)`` bool; both hold the same number of
        pixels, the size of a maximum matching.
    """
    pred = np.asarray(pred, dtype=bool)
    matcher = PixelMatcher(pred, gt, match_radius(pred.shape, max_dist))
    return matcher.match(pred)
