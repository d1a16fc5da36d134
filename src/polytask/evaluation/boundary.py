"""Boundary detection scores (odsF, oisF, AP) equivalent to SEISM, without MATLAB.

The multi-task literature (ASTMT, ATRC, InvPT and followers) scores boundaries with SEISM's
``fb`` measure on predictions saved as 8-bit PNGs, read by ``read_one_cont_png``, at the 101
thresholds of SEISM's ``parameters/HED.txt``. Per image this module:

1. reads the PNG as ``value / 255`` in single precision;
2. suppresses non-maxima across the boundary orientation (:mod:`.edge_nms`);
3. binarises the suppressed map at every threshold with a strict ``>`` (the single-precision
   value compared exactly with the double-precision threshold); MTI-Net's variant (no NMS,
   ``>=``, 0.01 ... 0.99) is available through :class:`BoundaryEvaluator`'s options;
4. thins each binary map and the ground-truth boundary map (:func:`polytask.ops.thinning.thin`);
5. matches thinned prediction and ground-truth pixels one-to-one within
   ``max_dist * sqrt(H^2 + W^2)`` pixels (:class:`.correspondence.PixelMatcher`);
6. records, per threshold, the matched pixels, the thinned prediction pixels and the thinned
   ground-truth pixels.

Counts are summed over the split: odsF is the best F over thresholds of the summed counts,
oisF sums every image's counts at that image's best threshold, AP integrates the split's
precision-recall curve, all as SEISM's ``gather_measure``/``general_ods``/``general_ois``/
``general_ap`` do. Results are fractions in [0, 1] (SEISM prints them with three decimals);
:class:`BoundaryODSMetric` reports percentages like the other metrics.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import Progress
from torchmetrics import Metric

from polytask.evaluation.correspondence import PixelMatcher, match_radius
from polytask.ops.thinning import thin
from polytask.evaluation.edge_nms import seism_nms
from polytask.constants import IGNORE_INDEX
from polytask.metrics._common import synced_states

#: SEISM ``parameters/HED.txt``: 0.001, 0.01, 0.02, ..., 0.99, 0.999 (101 values).
SEISM_THRESHOLDS: tuple[float, ...] = (0.001, *(k / 100 for k in range(1, 100)), 0.999)

#: MTI-Net's SEISM set-up (``Multi-Task-Learning-PyTorch``): 0.01, 0.02, ..., 0.99 (99 values).
MTINET_THRESHOLDS: tuple[float, ...] = tuple(k / 100 for k in range(1, 100))

#: Grid of recall values at which AP samples the interpolated precision (SEISM ``0:.01:1``).
_AP_RECALLS = np.arange(101) / 100

def read_prediction_png(path: str | os.PathLike) -> np.ndarray:
    """Read a boundary prediction PNG as SEISM does (``im2single``).

    Args:
        path: 8- or 16-bit single-channel PNG.

    Returns:
        ``(H, W)`` float32 values ``v / 255`` (``v / 65535`` for 16-bit).
    """
    array = np.asarray(Image.open(path))
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel PNG, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(65535)
    raise ValueError(f"{path}: expected an 8- or 16-bit PNG, got dtype {array.dtype}")


def quantize_probabilities(prob: np.ndarray) -> np.ndarray:
    """Round probabilities the way the InvPT family saves them: ``uint8(255 * p) / 255``.

    The cast truncates, so a value ``k / 255 <= p < (k + 1) / 255`` becomes ``k / 255``.

    Args:
        prob: ``(H, W)`` probabilities in [0, 1].

    Returns:
        ``(H, W)`` float32 in ``{0, 1/255, ..., 1}``.
    """
    scaled = np.clip(np.asarray(prob, dtype=np.float32) * np.float32(255), 0, 255)
    return np.floor(scaled).astype(np.float32) / np.float32(255)


def segmentation_boundaries(labels: np.ndarray) -> np.ndarray:
    """Boundary map of a label map as SEISM builds its PASCAL-Context ground truth (``seg2bmap``).

    A pixel is a boundary pixel when its east, south or south-east neighbour has another
    label; in the last row only the east neighbour and in the last column only the south
    neighbour counts, and the bottom-right pixel is never a boundary. (SEISM first splits
    regions into 4-connected components, ``relabel``; that cannot change this map, because a
    south-east neighbour with the same label as the pixel and its east and south neighbours
    is 4-connected to it.) SEISM then thins the map, as :meth:`BoundaryEvaluator.
    evaluate_image` does with every ground truth.

    Args:
        labels: ``(H, W)`` integer label map (e.g. the PASCAL-Context ``LabelMap``).

    Returns:
        ``(H, W)`` bool boundary map.
    """
    seg = np.asarray(labels)
    if seg.ndim != 2:
        raise ValueError(f"expected a 2-D label map, got shape {seg.shape}")
    bmap = np.zeros(seg.shape, dtype=bool)
    inner = seg[:-1, :-1]
    bmap[:-1, :-1] = (inner != seg[:-1, 1:]) | (inner != seg[1:, :-1]) | (inner != seg[1:, 1:])
    bmap[-1, :-1] = seg[-1, :-1] != seg[-1, 1:]
    bmap[:-1, -1] = seg[:-1, -1] != seg[1:, -1]
    return bmap


@dataclass(frozen=True)
class BoundaryCounts:
    """Per-threshold pixel counts of one image.

    Attributes:
        matched: ``(T,)`` int64 matched pairs (true positives; SEISM's ``cntP`` = ``cntR``).
        pred: ``(T,)`` int64 thinned prediction pixels (``sumP``).
        gt: ``(T,)`` int64 thinned ground-truth pixels (``sumR``), equal at every threshold.
    """

    matched: np.ndarray
    pred: np.ndarray
    gt: np.ndarray


@dataclass(frozen=True)
class BoundaryResult:
    """Split-level boundary scores, fractions in [0, 1].

    Attributes:
        ods_f: best F-measure over thresholds of the split-summed counts (odsF).
        ods_precision: precision at that threshold.
        ods_recall: recall at that threshold.
        ods_threshold: the threshold itself (first one on ties).
        ois_f: F-measure of the counts summed at every image's best threshold (oisF).
        ap: average precision of the split's precision-recall curve.
        thresholds: ``(T,)`` thresholds.
        precision: ``(T,)`` split precision per threshold.
        recall: ``(T,)`` split recall per threshold.
        f: ``(T,)`` split F-measure per threshold.
        n_images: number of images evaluated.
    """

    ods_f: float
    ods_precision: float
    ods_recall: float
    ods_threshold: float
    ois_f: float
    ap: float
    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f: np.ndarray
    n_images: int


def _f_measure(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """``2 P R / (P + R)``, 0 where ``P + R == 0``."""
    total = precision + recall
    return np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)


def split_precision_recall(matched: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of split-summed counts, with SEISM's ``gather_measure`` conventions.

    Where ``gt == 0`` and nothing matched: recall 1, precision 0; where ``pred == 0`` and
    nothing matched: recall 0, precision 1 (this one wins when both hold); elsewhere
    ``matched / gt`` and ``matched / pred`` (both 0 when nothing matched).

    Args:
        matched, pred, gt: ``(T,)`` counts.

    Returns:
        ``(precision, recall)``, each ``(T,)`` float64.
    """
    matched, pred, gt = (np.asarray(a, dtype=np.float64) for a in (matched, pred, gt))
    precision = np.zeros_like(matched)
    recall = np.zeros_like(matched)
    no_gt = (gt == 0) & (matched == 0)
    recall[no_gt], precision[no_gt] = 1.0, 0.0
    no_pred = (pred == 0) & (matched == 0)
    recall[no_pred], precision[no_pred] = 0.0, 1.0
    ok = (pred != 0) & (matched != 0)
    recall[ok] = matched[ok] / gt[ok]
    precision[ok] = matched[ok] / pred[ok]
    return precision, recall


def _image_precision_recall(matched: float, pred: float, gt: float) -> tuple[float, float]:
    """SEISM ``eval_cont`` conventions: no GT gives (P, R) = (0, 1), else no prediction (1, 0)."""
    if gt == 0:
        return 0.0, 1.0
    if pred == 0:
        return 1.0, 0.0
    return matched / pred, matched / gt


def best_threshold_index(counts: BoundaryCounts) -> int:
    """Index of an image's best threshold, as SEISM's ``general_ois`` picks it.

    SEISM stores each image's F-measure with six decimals (``%f``) and takes the first
    maximum, so thresholds whose F agree to six decimals tie and the lowest one wins.
    """
    f = np.zeros(counts.matched.shape, dtype=np.float64)
    valid = (counts.gt > 0) & (counts.pred > 0)
    precision = counts.matched[valid] / counts.pred[valid]
    recall = counts.matched[valid] / counts.gt[valid]
    f[valid] = _f_measure(precision, recall)
    return int(np.argmax(np.round(f, 6)))


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """SEISM ``general_ap``: mean interpolated precision on the recall grid 0, 0.01, ..., 1.

    The curve keeps one point per distinct recall (its first occurrence in threshold order),
    precision is interpolated linearly between them, grid points outside the curve's recall
    range are dropped, and the sum is divided by 100.

    Args:
        precision: ``(T,)`` split precision per threshold.
        recall: ``(T,)`` split recall per threshold.
    """
    unique_recall, first = np.unique(np.asarray(recall, dtype=np.float64), return_index=True)
    if unique_recall.size < 2:
        return 0.0
    curve_precision = np.asarray(precision, dtype=np.float64)[first]
    grid = _AP_RECALLS[(_AP_RECALLS >= unique_recall[0]) & (_AP_RECALLS <= unique_recall[-1])]
    return float(np.interp(grid, unique_recall, curve_precision).sum() / 100)


def summarize_counts(
    thresholds: Sequence[float],
    total: BoundaryCounts,
    ois: tuple[int, int, int],
    n_images: int,
) -> BoundaryResult:
    """Split scores from summed counts.

    Args:
        thresholds: ``(T,)`` thresholds of the counts.
        total: per-threshold counts summed over the split.
        ois: ``(matched, pred, gt)`` summed over images, each at its best threshold.
        n_images: number of images.
    """
    precision, recall = split_precision_recall(total.matched, total.pred, total.gt)
    f = _f_measure(precision, recall)
    best = int(np.argmax(f))
    ois_p, ois_r = _image_precision_recall(*(float(v) for v in ois))
    ois_f = float(_f_measure(np.array(ois_p), np.array(ois_r)))
    return BoundaryResult(
        ods_f=float(f[best]),
        ods_precision=float(precision[best]),
        ods_recall=float(recall[best]),
        ods_threshold=float(thresholds[best]),
        ois_f=ois_f,
        ap=average_precision(precision, recall),
        thresholds=np.asarray(thresholds, dtype=np.float64),
        precision=precision,
        recall=recall,
        f=f,
        n_images=n_images,
    )


def summarize_images(thresholds: Sequence[float], counts: Sequence[BoundaryCounts]) -> BoundaryResult:
    """Split scores from the per-image counts of :meth:`BoundaryEvaluator.evaluate_image`."""
    if not counts:
        raise ValueError("no images to summarise")
    total = BoundaryCounts(
        matched=np.sum([c.matched for c in counts], axis=0),
        pred=np.sum([c.pred for c in counts], axis=0),
        gt=np.sum([c.gt for c in counts], axis=0),
    )
    best = [best_threshold_index(c) for c in counts]
    ois = (
        int(sum(c.matched[k] for c, k in zip(counts, best))),
        int(sum(c.pred[k] for c, k in zip(counts, best))),
        int(sum(c.gt[k] for c, k in zip(counts, best))),
    )
    return summarize_counts(thresholds, total, ois, len(counts))


def _resolve_thresholds(thresholds: int | Sequence[float]) -> tuple[float, ...]:
    """An int ``K`` gives Dollar's ``edgesEvalImg`` grid ``linspace(1/(K+1), K/(K+1), K)``."""
    if isinstance(thresholds, int):
        if thresholds < 1:
            raise ValueError(f"thresholds must be >= 1, got {thresholds}")
        return tuple(float(t) for t in np.linspace(1 / (thresholds + 1), 1 - 1 / (thresholds + 1), thresholds))
    values = tuple(float(t) for t in thresholds)
    if not values:
        raise ValueError("thresholds must not be empty")
    return values


def _load_sample(sample: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Unpack ``(pred, gt)`` or ``(pred, gt, ignore)``, reading the PNGs given as paths."""
    if len(sample) not in (2, 3):
        raise ValueError(f"a sample is (pred, gt) or (pred, gt, ignore), got {len(sample)} items")
    pred, gt = sample[0], sample[1]
    ignore = sample[2] if len(sample) == 3 else None
    if not isinstance(pred, np.ndarray):
        pred = read_prediction_png(pred)
    if not isinstance(gt, np.ndarray):
        gt = np.asarray(Image.open(gt))
    return pred, gt, ignore


def _evaluate_chunk(options: dict[str, Any], samples: list[Sequence[Any]]) -> list[BoundaryCounts]:
    """Worker entry point: evaluate a list of samples with ``BoundaryEvaluator(**options)``."""
    evaluator = BoundaryEvaluator(**options)
    out = []
    for sample in samples:
        pred, gt, ignore = _load_sample(sample)
        out.append(evaluator.evaluate_image(pred, gt, ignore))
    return out


def _chunks(samples: Iterable[Sequence[Any]], size: int) -> Iterator[list[Sequence[Any]]]:
    """Consecutive lists of ``size`` samples (the last one shorter), read lazily."""
    chunk: list[Sequence[Any]] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class BoundaryEvaluator:
    """SEISM-equivalent boundary evaluation of probability maps against boundary maps.

    The defaults are the protocol of ASTMT, ATRC, InvPT and their followers (SEISM's
    ``read_one_cont_png``: NMS, HED thresholds, strict ``>``). InvPT's released SEISM set-up
    builds every ground truth as SEISM does for a segmentation, ``thin(seg2bmap(labels))``,
    from the PASCAL-Context ``LabelMap`` and from the NYUD-v2 ``edge/<id>.png`` read as a
    label image: pass those arrays with ``gt_labels=True``. MTI-Net's set-up reads the
    maps without NMS and binarises with ``>=`` at 0.01, ..., 0.99:
    ``BoundaryEvaluator(max_dist, MTINET_THRESHOLDS, nms=False, strict=False, gt_labels=True)``.

    Args:
        max_dist: matching tolerance as a fraction of the image diagonal (a dataset's is its
            datamodule's ``boundary_protocol.max_dist``, :class:`polytask.data.protocols.BoundaryProtocol`).
        thresholds: the thresholds or their number ``K`` (then
            ``linspace(1/(K+1), K/(K+1), K)``); default SEISM's HED list.
        nms: apply the orientation NMS (:func:`.edge_nms.seism_nms`) before thresholding.
        strict: binarise with ``value > threshold``; ``value >= threshold`` when false.
        gt_labels: the ground truth is a label map whose boundaries
            (:func:`segmentation_boundaries`) are scored; otherwise it is a boundary map
            (non-zero = boundary). Either is thinned.
        workers: processes used by :meth:`evaluate` (1 = in this process).
        chunksize: images per task sent to a worker process.
    """

    def __init__(
        self,
        max_dist: float,
        thresholds: int | Sequence[float] = SEISM_THRESHOLDS,
        nms: bool = True,
        strict: bool = True,
        gt_labels: bool = False,
        workers: int = 1,
        chunksize: int = 4,
    ) -> None:
        if not 0 < max_dist < 1:
            raise ValueError(f"max_dist is a fraction of the image diagonal in (0, 1), got {max_dist}")
        if workers < 1 or chunksize < 1:
            raise ValueError(f"workers and chunksize must be >= 1, got {workers} and {chunksize}")
        self.max_dist = float(max_dist)
        self.thresholds = _resolve_thresholds(thresholds)
        self.nms = nms
        self.strict = strict
        self.gt_labels = gt_labels
        self.workers = workers
        self.chunksize = chunksize

    def _binarise(self, edges: np.ndarray, threshold: float) -> np.ndarray:
        """``(H, W)`` bool map of the values above (or, not strict, at least) ``threshold``."""
        return edges > threshold if self.strict else edges >= threshold

    def evaluate_image(self, pred: np.ndarray, gt: np.ndarray, ignore: np.ndarray | None = None) -> BoundaryCounts:
        """Per-threshold counts of one image.

        Args:
            pred: ``(H, W)`` boundary probabilities in [0, 1] (quantised to ``k / 255`` to
                reproduce an evaluation of saved PNGs).
            gt: ``(H, W)`` ground-truth boundary map (non-zero = boundary) or, with
                ``gt_labels``, label map; its boundary pixels are thinned here.
            ignore: optional ``(H, W)`` bool map of ignored pixels (padding). Both maps are
                cropped to the bounding box of the non-ignored pixels, which is the image
                SEISM would have seen; ignored pixels inside that box count as non-boundary.

        Returns:
            The image's :class:`BoundaryCounts`.
        """
        pred = np.asarray(pred, dtype=np.float32)
        gt = np.asarray(gt)
        if pred.shape != gt.shape or pred.ndim != 2:
            raise ValueError(f"pred and gt must be equal 2-D shapes, got {pred.shape} and {gt.shape}")
        if ignore is not None:
            ignore = np.asarray(ignore, dtype=bool)
            if ignore.shape != gt.shape:
                raise ValueError(f"ignore has shape {ignore.shape}, expected {gt.shape}")
            rows = np.flatnonzero(~ignore.all(axis=1))
            cols = np.flatnonzero(~ignore.all(axis=0))
            n_thr = len(self.thresholds)
            if rows.size == 0:
                zeros = np.zeros(n_thr, dtype=np.int64)
                return BoundaryCounts(matched=zeros, pred=zeros.copy(), gt=zeros.copy())
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            pred, gt, ignore = pred[box], gt[box], ignore[box]
        if min(pred.shape) < 2:
            raise ValueError(f"images must be at least 2x2, got {pred.shape}")
        boundary = segmentation_boundaries(gt) if self.gt_labels else gt != 0
        if ignore is not None:
            boundary &= ~ignore

        # float64 copies of the float32 values: each is compared exactly with the threshold
        edges = (seism_nms(pred) if self.nms else pred).astype(np.float64)
        gt_thin = thin(boundary)
        n_gt = int(gt_thin.sum())
        candidates = self._binarise(edges, min(self.thresholds))
        matcher = PixelMatcher(candidates, gt_thin, match_radius(gt.shape, self.max_dist))
        matched = np.zeros(len(self.thresholds), dtype=np.int64)
        n_pred = np.zeros(len(self.thresholds), dtype=np.int64)
        partner = None
        # highest threshold first: each matching warm-starts the next, larger problem
        for k in np.argsort(self.thresholds)[::-1]:
            pred_thin = thin(self._binarise(edges, self.thresholds[k]))
            n_pred[k] = int(pred_thin.sum())
            partner = matcher.maximum_matching(pred_thin, partner)
            matched[k] = int(np.count_nonzero(partner >= 0))
        return BoundaryCounts(matched=matched, pred=n_pred, gt=np.full(len(self.thresholds), n_gt, dtype=np.int64))

    def evaluate_counts(
        self, samples: Iterable[Sequence[Any]], progress: bool = False, total: int | None = None
    ) -> list[BoundaryCounts]:
        """Per-image counts of many samples, in input order.

        Args:
            samples: ``(pred, gt)`` or ``(pred, gt, ignore)`` tuples; ``pred`` is an array
                as in :meth:`evaluate_image` or the path of a prediction PNG
                (:func:`read_prediction_png`), ``gt`` an array as in :meth:`evaluate_image` or
                the path of a PNG holding it.
            progress: show a progress bar.
            total: number of samples, for the progress bar when ``samples`` has no length.
        """
        if total is None and isinstance(samples, Sequence):
            total = len(samples)
        counts: list[BoundaryCounts] = []
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("boundary evaluation", total=total)
            if self.workers == 1:
                for sample in samples:
                    pred, gt, ignore = _load_sample(sample)
                    counts.append(self.evaluate_image(pred, gt, ignore))
                    bar.advance(task)
                return counts
            options = {
                "max_dist": self.max_dist,
                "thresholds": self.thresholds,
                "nms": self.nms,
                "strict": self.strict,
                "gt_labels": self.gt_labels,
            }
            with ProcessPoolExecutor(max_workers=self.workers) as pool:
                pending: list[Future[list[BoundaryCounts]]] = []
                for chunk in _chunks(samples, self.chunksize):
                    pending.append(pool.submit(_evaluate_chunk, options, chunk))
                    while len(pending) >= 2 * self.workers:
                        done = pending.pop(0).result()
                        counts.extend(done)
                        bar.advance(task, len(done))
                for future in pending:
                    done = future.result()
                    counts.extend(done)
                    bar.advance(task, len(done))
        return counts

    def evaluate(
        self, samples: Iterable[Sequence[Any]], progress: bool = False, total: int | None = None
    ) -> BoundaryResult:
        """Split scores of many samples (see :meth:`evaluate_counts` for ``samples``)."""
        return summarize_images(self.thresholds, self.evaluate_counts(samples, progress, total))


class BoundaryODSMetric(Metric):
    """SEISM-equivalent odsF, oisF and AP accumulated in memory during a test loop.

    Each image of a batch is evaluated on the CPU by :class:`BoundaryEvaluator` (about a
    second per NYUD-size image); the per-threshold counts and the counts at every image's
    best threshold are sum-reduced states, so the result equals :meth:`BoundaryEvaluator.
    evaluate` on the same images, also across processes.

    Args:
        max_dist: matching tolerance as a fraction of the image diagonal (a dataset's is its
            datamodule's ``boundary_protocol.max_dist``, :class:`polytask.data.protocols.BoundaryProtocol`).
        thresholds, nms, strict: as in :class:`BoundaryEvaluator`.
        gt_labels: take the target's boundaries with :func:`segmentation_boundaries` (as
            SEISM does with the NYUD-v2 edge PNG) instead of its boundary pixels.
        quantize: truncate probabilities to ``k / 255`` first, as saving 8-bit PNGs does, so
            the score equals the evaluation of saved predictions.
        ignore_index: target value of ignored (padding) pixels; the image is cropped to the
            bounding box of the other pixels.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    matched: torch.Tensor
    pred_total: torch.Tensor
    gt_total: torch.Tensor
    ois_counts: torch.Tensor
    n_images: torch.Tensor

    def __init__(
        self,
        max_dist: float,
        thresholds: int | Sequence[float] = SEISM_THRESHOLDS,
        nms: bool = True,
        strict: bool = True,
        gt_labels: bool = False,
        quantize: bool = True,
        ignore_index: int = IGNORE_INDEX,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.evaluator = BoundaryEvaluator(max_dist, thresholds, nms=nms, strict=strict, gt_labels=gt_labels)
        self.quantize = quantize
        self.ignore_index = ignore_index
        n_thr = len(self.evaluator.thresholds)
        for name in ("matched", "pred_total", "gt_total"):
            self.add_state(name, torch.zeros(n_thr, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ois_counts", torch.zeros(3, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n_images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: ``(B, 1, H, W)`` boundary probabilities.
            target: ``(B, 1, H, W)`` boundary labels in {0, 1}, or ``ignore_index``.
        """
        if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 1:
            raise ValueError(f"expected pred and target of shape (B, 1, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}")
        probs = pred.detach().float().cpu().numpy()[:, 0]
        labels = target.detach().cpu().numpy()[:, 0]
        for prob, label in zip(probs, labels):
            ignore = label == self.ignore_index
            bad = ~ignore & (label != 0) & (label != 1)
            if bad.any():
                raise ValueError(f"boundary target contains value {label[bad][0]}; expected 0, 1 or {self.ignore_index}")
            if self.quantize:
                prob = quantize_probabilities(prob)
            counts = self.evaluator.evaluate_image(prob, np.where(ignore, 0, label), ignore)
            best = best_threshold_index(counts)
            self.matched += torch.from_numpy(counts.matched).to(self.matched.device)
            self.pred_total += torch.from_numpy(counts.pred).to(self.pred_total.device)
            self.gt_total += torch.from_numpy(counts.gt).to(self.gt_total.device)
            self.ois_counts += torch.tensor(
                [counts.matched[best], counts.pred[best], counts.gt[best]], dtype=torch.long, device=self.ois_counts.device
            )
            self.n_images += 1

    def result(self) -> BoundaryResult:
        """The full :class:`BoundaryResult` of the counts accumulated over the split."""
        with synced_states(self):
            total = BoundaryCounts(
                matched=self.matched.cpu().numpy(), pred=self.pred_total.cpu().numpy(), gt=self.gt_total.cpu().numpy()
            )
            ois_matched, ois_pred, ois_gt = (int(v) for v in self.ois_counts.tolist())
            n_images = int(self.n_images)
        return summarize_counts(self.evaluator.thresholds, total, (ois_matched, ois_pred, ois_gt), n_images)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"odsF", "oisF", "ap"}`` in percent (float64 scalars)."""
        res = self.result()
        return {
            "odsF": torch.tensor(100.0 * res.ods_f, dtype=torch.float64),
            "oisF": torch.tensor(100.0 * res.ois_f, dtype=torch.float64),
            "ap": torch.tensor(100.0 * res.ap, dtype=torch.float64),
        }
