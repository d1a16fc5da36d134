"""``polytask evaluate``: score saved prediction files against a benchmark's ground truth.

Ground truth is read by the dataset readers at the original resolution (no transform);
predictions by :mod:`polytask.evaluation.prediction_io`. Every task is scored by the metric its
:class:`~polytask.tasks.Task` builds for in-memory evaluation (saliency with the chosen
``legacy_sigmoid``), and boundaries additionally by the SEISM-equivalent
:class:`~polytask.evaluation.boundary.BoundaryEvaluator` (odsF / oisF / AP) with the dataset's
``MAX_DIST``, on the chosen boundary subset.

Segmentation tasks also get their per-class IoU under the split-level protocol, keyed by the class
names of the task the dataset builds (e.g. the ``classes`` of a folder dataset's ``polytask.yaml``).

``protocol="maximum_roaming"`` scores with the metrics of Maximum Roaming's scripts instead
(:mod:`polytask.metrics.maximum_roaming`), fed the split in file order in batches of the
scripts' batch size (:data:`MAXIMUM_ROAMING_BATCH_SIZE`), as their evaluation loops are.

All prediction files are checked (presence, format, size) before anything is scored; every
problem is listed by file name and the command exits with status 1 without results. A folder of
the prediction directory that names no task of the dataset (other than the PredictionWriter's
``pictures``) is such a problem too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from torchmetrics import Metric

from polytask.data.io import DataFileError, FileDataset, read_lines
from polytask.data.registry import registry
from polytask.evaluation.boundary import MAX_DIST, BoundaryEvaluator, segmentation_boundaries, summarize_images
from polytask.evaluation.prediction_io import PredictionFileError, probe_prediction, read_prediction
from polytask.metrics import MetricProtocol, check_protocol, protocol_setting
from polytask.tasks import Task

DATASETS: tuple[str, ...] = ("pascal_context", "nyud", "nyuv2_mtan", "cityscapes_mtan", "folder")

#: Batch size of the evaluation loops of Maximum Roaming's scripts (their ``--batch_size``
#: default, shared by training and evaluation): ``nyuv2/train_*.py`` 2, ``cityscapes/train_*.py``
#: 8. (CelebA's 256 applies in memory only: attribute predictions have no file format.)
MAXIMUM_ROAMING_BATCH_SIZE: dict[str, int] = {"nyuv2_mtan": 2, "cityscapes_mtan": 8}
BoundarySubset = Literal["all", "test_new"]

#: Folders of a prediction directory that hold no task's predictions: the pictures the
#: PredictionWriter draws next to the prediction files (``PRED/pictures/<id>.png``).
NON_TASK_FOLDERS: frozenset[str] = frozenset({"pictures"})

#: SHA-256 of SEISM's ``src/gt_wrappers/gt_sets/PASCALContext/test_new.txt`` (2,498 val ids, sorted,
#: one per line with a final newline), to recognise the list without shipping it.
SEISM_TEST_NEW_SHA256 = "1998ea178a4683c851a7db0c5c6d41dcbc026e9502d4a6f10bb3668862cff0ce"
SEISM_TEST_NEW_SIZE = 2498

#: What SEISM's boundary ground truth is made from, per dataset (see :meth:`FileDataset.seism_label_map`).
SEISM_GROUND_TRUTH: dict[str, str] = {
    "pascal_context": "seg2bmap(LabelMap)",
    "nyud": "seg2bmap(edge map)",
}


class EvaluationSetupError(ValueError):
    """The evaluation cannot start (bad arguments, unreadable dataset root or id list)."""


def saliency_setting(legacy_sigmoid: bool) -> str:
    """One line saying how saliency maxF treated the probabilities."""
    if legacy_sigmoid:
        return "sal maxF: legacy_sigmoid=on (sigmoid applied to the probabilities first, as the InvPT-family evaluations do)"
    return "sal maxF: legacy_sigmoid=off (probabilities thresholded as they are)"


def id_list_sha256(ids: Sequence[str]) -> str:
    """SHA-256 of the sorted unique ids, one per line with a final newline."""
    return hashlib.sha256(("\n".join(sorted(set(ids))) + "\n").encode()).hexdigest()


@dataclass(frozen=True)
class BoundarySelection:
    """The images boundaries are scored on.

    Attributes:
        name: ``all``, ``test_new`` or ``custom``.
        ids: the selected ids (None: every id of the split).
        source: the id file they came from, if any.
    """

    name: str
    ids: frozenset[str] | None = None
    source: Path | None = None

    def __contains__(self, sample_id: str) -> bool:
        return self.ids is None or sample_id in self.ids

    def describe(self, n_split: int) -> str:
        """E.g. ``test_new (2498 of 5105 ids, from FILE)``."""
        count = n_split if self.ids is None else len(self.ids)
        origin = f", from {self.source}" if self.source is not None else ""
        return f"{self.name} ({count} of {n_split} ids{origin})"


def boundary_selection(
    dataset_name: str, split: str, split_ids: Sequence[str], subset: BoundarySubset, ids_file: Path | None
) -> BoundarySelection:
    """Resolve ``--boundary-subset`` and ``--boundary-ids``.

    * ``all`` without a file: every id of the split.
    * an id file: those ids; named ``test_new`` when the file is SEISM's PASCAL ``test_new``
      list (checked by :data:`SEISM_TEST_NEW_SHA256`), ``custom`` otherwise.
    * ``test_new`` on PASCAL-Context: needs SEISM's list as the id file.
    * ``test_new`` on NYUD: SEISM's NYUD ``test_new`` holds every val image, so all val ids.

    Raises:
        EvaluationSetupError: ``test_new`` on another split, a PASCAL ``test_new`` without
            SEISM's list, an unreadable or empty id file, or ids not in the split.
    """
    if subset == "test_new" and dataset_name not in SEISM_GROUND_TRUTH:
        raise EvaluationSetupError(
            f"boundary subset test_new is SEISM's list of {sorted(SEISM_GROUND_TRUTH)}, not of {dataset_name!r}; "
            "pass --boundary-ids FILE to score the boundaries of a subset"
        )
    if subset == "test_new" and split != "val":
        raise EvaluationSetupError(f"boundary subset test_new is part of the val split, not of {split!r}")
    if ids_file is None:
        if subset == "all":
            return BoundarySelection("all")
        if dataset_name == "nyud":
            return BoundarySelection("test_new")
        raise EvaluationSetupError(
            "PASCAL-Context boundary subset test_new needs its id list: pass --boundary-ids "
            "seism/src/gt_wrappers/gt_sets/PASCALContext/test_new.txt (see docs/evaluation.md)"
        )
    try:
        ids = read_lines(ids_file)
    except DataFileError as err:
        raise EvaluationSetupError(f"--boundary-ids: {err}") from err
    if not ids:
        raise EvaluationSetupError(f"--boundary-ids: {ids_file} lists no id")
    outside = sorted(set(ids) - set(split_ids))
    if outside:
        shown = ", ".join(outside[:10]) + (f" and {len(outside) - 10} more" if len(outside) > 10 else "")
        raise EvaluationSetupError(f"--boundary-ids: {ids_file} lists {len(outside)} id(s) not in the {split} split: {shown}")
    seism = dataset_name == "pascal_context" and id_list_sha256(ids) == SEISM_TEST_NEW_SHA256
    if subset == "test_new" and dataset_name == "pascal_context" and not seism:
        raise EvaluationSetupError(
            f"--boundary-ids: {ids_file} ({len(set(ids))} ids) is not SEISM's PASCAL-Context test_new list "
            f"({SEISM_TEST_NEW_SIZE} ids, sha256 {SEISM_TEST_NEW_SHA256[:12]}...); drop --boundary-subset test_new "
            "to score a custom subset"
        )
    return BoundarySelection("test_new" if seism or subset == "test_new" else "custom", frozenset(ids), Path(ids_file))


@dataclass
class EvaluationReport:
    """What an evaluation found.

    Attributes:
        dataset, split, root, pred_dir: what was evaluated.
        n_images: images of the split.
        results: ``{task: {metric: value}}`` (empty when there were problems).
        per_class_iou: ``{task: {class name: IoU}}`` in percent for the segmentation tasks scored
            by the split-level metric, classes in id order (empty when there were problems).
        settings: the protocol settings the numbers depend on (JSON-serialisable).
        notes: one line per setting, for tables.
        problems: one line per missing or malformed file, naming it.
    """

    dataset: str
    split: str
    root: Path
    pred_dir: Path
    n_images: int
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    per_class_iou: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def payload(self) -> dict[str, Any]:
        """The JSON written by ``--json``."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "root": str(self.root),
            "pred_dir": str(self.pred_dir),
            "n_images": self.n_images,
            "settings": self.settings,
            "results": self.results,
            "per_class_iou": self.per_class_iou,
        }


@dataclass
class LoadedSplit:
    """The split :func:`load_split` built.

    Attributes:
        dataset: the untransformed split.
        tasks: the tasks to score.
        split: the on-disk split (the default resolved).
        dataset_tasks: every task the dataset has, by name.
        task_source: where the dataset's tasks are declared, if a file does (a folder dataset's
            ``polytask.yaml``), for messages.
    """

    dataset: FileDataset
    tasks: list[Task]
    split: str
    dataset_tasks: list[str]
    task_source: Path | None = None


def load_split(dataset_name: str, root: Path, split: str | None, task_names: Sequence[str] | None) -> LoadedSplit:
    """The untransformed dataset of ``split`` and its tasks.

    Args:
        dataset_name: one of :data:`DATASETS`.
        root: the dataset directory.
        split: an on-disk split; None: the split the dataset's test stage reads (``val`` for the
            benchmarks; for a folder dataset ``test`` when it has one, else ``val``).
        task_names: tasks to score (default: all the dataset's).

    Raises:
        EvaluationSetupError: unknown dataset, split or task, or a root that cannot be listed
            (for a folder dataset also a missing or malformed ``polytask.yaml``).
    """
    if dataset_name not in DATASETS:
        raise EvaluationSetupError(f"unknown dataset {dataset_name!r}; polytask evaluate knows {list(DATASETS)}")
    module_class = registry()[dataset_name]
    try:
        module = module_class(root=root, tasks=list(task_names) if task_names else None)
    except DataFileError as err:
        raise EvaluationSetupError(f"{dataset_name} root {root}: {err}") from err
    except ValueError as err:
        raise EvaluationSetupError(str(err)) from err
    split = split or module.stage_splits["test"]
    if split not in module.disk_splits:
        raise EvaluationSetupError(f"{dataset_name} has no split {split!r}; it has {list(module.disk_splits)}")
    try:
        dataset = module.build_split(split, module.tasks)
    except DataFileError as err:
        raise EvaluationSetupError(f"{dataset_name} root {root}: {err}") from err
    except ValueError as err:
        raise EvaluationSetupError(str(err)) from err
    return LoadedSplit(
        dataset, list(module.tasks), split, [t.name for t in module.available_tasks()], getattr(module, "spec_path", None)
    )


def unknown_task_folders(pred_dir: Path, loaded: LoadedSplit, dataset_name: str) -> list[str]:
    """One line per folder of ``pred_dir`` that names no task of the dataset (hidden folders and
    :data:`NON_TASK_FOLDERS` aside)."""
    known = set(loaded.dataset_tasks)
    where = str(loaded.task_source) if loaded.task_source is not None else f"the {dataset_name} dataset"
    return [
        f"{folder}: predictions of task {folder.name!r}, which {where} does not define "
        f"(its tasks: {', '.join(loaded.dataset_tasks)}); rename the folder or remove it"
        for folder in sorted(pred_dir.iterdir())
        if folder.is_dir() and not folder.name.startswith(".") and folder.name not in known | NON_TASK_FOLDERS
    ]


def check_predictions(dataset: FileDataset, tasks: Sequence[Task], pred_dir: Path) -> list[str]:
    """Header-level check of every expected prediction file; one line per problem.

    A task whose folder is missing gives one line instead of one per sample.
    """
    problems: list[str] = []
    present = []
    for task in tasks:
        folder = pred_dir / task.name
        if folder.is_dir():
            present.append(task)
        else:
            problems.append(f"{folder}: folder missing: no predictions of task {task.name!r} ({len(dataset)} expected)")
    for index, sample_id in enumerate(dataset.ids):
        try:
            shape = dataset.image_size(index)
        except DataFileError as err:
            problems.append(f"ground truth: {err}")
            continue
        for task in present:
            try:
                probe_prediction(pred_dir, task, sample_id, shape)
            except PredictionFileError as err:
                problems.append(str(err))
    return problems


def protocol_batch_size(dataset_name: str, protocol: str, batch_size: int | None) -> int:
    """The number of consecutive samples each metric update gets.

    Split-level metrics do not depend on it (1). ``maximum_roaming`` averages per batch, so it uses
    the batch size of Maximum Roaming's scripts for the dataset, or ``batch_size`` when given.

    Raises:
        EvaluationSetupError: an unknown protocol, ``batch_size`` with the split-level protocol or
            below 1, or ``maximum_roaming`` on a dataset Maximum Roaming does not evaluate.
    """
    try:
        protocol = check_protocol(protocol)
    except ValueError as err:
        raise EvaluationSetupError(str(err)) from err
    if protocol == "split_level":
        if batch_size is not None:
            raise EvaluationSetupError(
                "--batch-size applies to --protocol maximum_roaming only (split-level metrics do not depend on it)"
            )
        return 1
    if dataset_name not in MAXIMUM_ROAMING_BATCH_SIZE:
        raise EvaluationSetupError(
            f"protocol maximum_roaming is defined for {sorted(MAXIMUM_ROAMING_BATCH_SIZE)} (Maximum Roaming's "
            f"MTAN NYUv2 and Cityscapes), not for {dataset_name!r}"
        )
    if batch_size is not None and batch_size < 1:
        raise EvaluationSetupError(f"--batch-size must be >= 1, got {batch_size}")
    return batch_size or MAXIMUM_ROAMING_BATCH_SIZE[dataset_name]


@dataclass
class _Batch:
    """Samples of one task waiting for a metric update: their indices, predictions and targets."""

    indices: list[int] = field(default_factory=list)
    preds: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)


def _update(metric: Metric, task: Task, dataset: FileDataset, batch: _Batch, problems: MutableSequence[str]) -> None:
    """Update ``metric`` with the stacked samples of ``batch`` and empty it; a rejected batch is a problem."""
    if not batch.indices:
        return
    if len({tuple(t.shape) for t in batch.targets}) > 1:
        ids = ", ".join(dataset.ids[i] for i in batch.indices)
        problems.append(f"task {task.name!r}: samples {ids} of one batch differ in size; per-batch metrics need one size")
    else:
        try:
            metric.update(torch.stack(batch.preds), torch.stack(batch.targets))
        except ValueError as err:
            files = ", ".join(str(dataset.target_file(i, task.name)) for i in batch.indices)
            problems.append(f"ground truth: {files}: task {task.name!r}: {err}")
    batch.indices.clear()
    batch.preds.clear()
    batch.targets.clear()


def _score_samples(
    dataset: FileDataset,
    tasks: Sequence[Task],
    pred_dir: Path,
    metrics: dict[str, Metric],
    selection: BoundarySelection,
    problems: MutableSequence[str],
    progress: Progress,
    batch_size: int = 1,
    seism: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Update ``metrics`` with batches of ``batch_size`` consecutive samples; yield edge ``(probability, SEISM gt)`` pairs.

    ``seism=False`` (a dataset without SEISM protocol): the edge task updates its metric only, no pair is yielded.

    Problems are appended to ``problems``; once there is one, no more boundary pairs are yielded
    (no result will be reported) but every remaining file is still read to list all problems.
    """
    pending = {task.name: _Batch() for task in tasks}
    bar = progress.add_task("reading and scoring", total=len(dataset))
    for index, sample_id in enumerate(dataset.ids):
        shape = dataset.image_size(index)
        for task in tasks:
            edge = task.is_boundary
            if edge and sample_id not in selection:
                continue
            try:
                pred = read_prediction(pred_dir, task, sample_id, shape)
                target = dataset.validated_target(index, task.name)
                gt = segmentation_boundaries(dataset.seism_label_map(index, target)) if edge and seism else None
            except PredictionFileError as err:
                problems.append(str(err))
                continue
            except DataFileError as err:
                problems.append(f"ground truth: {err}")
                continue
            batch = pending[task.name]
            batch.indices.append(index)
            batch.preds.append(pred)
            batch.targets.append(target)
            if len(batch.indices) == batch_size:
                _update(metrics[task.name], task, dataset, batch, problems)
            if gt is not None and not problems:
                yield pred[0].numpy(), gt
        progress.advance(bar)
    for task in tasks:
        _update(metrics[task.name], task, dataset, pending[task.name], problems)


def evaluate_predictions(
    dataset_name: str,
    root: str | Path,
    pred_dir: str | Path,
    split: str | None = None,
    tasks: Sequence[str] | None = None,
    boundary_subset: BoundarySubset = "all",
    boundary_ids: str | Path | None = None,
    legacy_sigmoid: bool = False,
    workers: int = 1,
    console: Console | None = None,
    protocol: MetricProtocol = "split_level",
    batch_size: int | None = None,
) -> EvaluationReport:
    """Score the prediction files of ``pred_dir`` against a split's ground truth.

    Args:
        dataset_name: one of :data:`DATASETS`.
        root: the dataset directory.
        pred_dir: the prediction folder (``<task>/<id>.png|.npy``).
        split: the split whose ids and ground truth are used (default: the split the dataset's
            test stage reads: ``val`` for the benchmarks, ``test`` or else ``val`` for a folder
            dataset).
        tasks: task names (default: every task of the dataset).
        boundary_subset: ``all`` or ``test_new`` (see :func:`boundary_selection`).
        boundary_ids: a file of ids the boundaries are scored on.
        legacy_sigmoid: saliency maxF with the InvPT-family sigmoid quirk.
        workers: processes of the boundary evaluation.
        console: where the progress bar goes (none without).
        protocol: ``split_level`` or ``maximum_roaming`` (Maximum Roaming's metrics, MTAN datasets only).
        batch_size: ``maximum_roaming`` only: consecutive samples per metric update (default: the
            batch size of Maximum Roaming's scripts, :data:`MAXIMUM_ROAMING_BATCH_SIZE`).

    Returns:
        The report; ``results`` and ``per_class_iou`` are empty and ``problems`` lists every
        file problem when any.

    Raises:
        EvaluationSetupError: see :func:`load_split`, :func:`boundary_selection` and
            :func:`protocol_batch_size`, or a task the protocol has no metric for.
    """
    root, pred_dir = Path(root).expanduser(), Path(pred_dir).expanduser()
    if workers < 1:
        raise EvaluationSetupError(f"--workers must be >= 1, got {workers}")
    if not pred_dir.is_dir():
        raise EvaluationSetupError(f"prediction folder {pred_dir} does not exist")
    batch_size = protocol_batch_size(dataset_name, protocol, batch_size)
    loaded = load_split(dataset_name, root, split, tasks)
    dataset, task_list, split = loaded.dataset, loaded.tasks, loaded.split
    task_list = [t.with_metric_options(legacy_sigmoid=legacy_sigmoid) for t in task_list]
    try:
        metrics = {t.name: t.make_metric(protocol) for t in task_list}
    except ValueError as err:
        raise EvaluationSetupError(str(err)) from err
    has_edge = any(t.is_boundary for t in task_list)
    use_seism = has_edge and dataset_name in SEISM_GROUND_TRUTH
    if not has_edge and (boundary_ids is not None or boundary_subset != "all"):
        raise EvaluationSetupError("a boundary subset was given but the edge task is not evaluated")
    ids_file = Path(boundary_ids) if boundary_ids is not None else None
    selection = boundary_selection(dataset_name, split, dataset.ids, boundary_subset, ids_file)
    report = EvaluationReport(dataset_name, split, root, pred_dir, len(dataset))
    report.settings = {"tasks": [t.name for t in task_list], "protocol": protocol}
    report.notes.append(protocol_setting(protocol))
    if protocol == "maximum_roaming":
        report.settings["batch_size"] = batch_size
        report.notes.append(
            f"maximum_roaming batches: {batch_size} consecutive ids in file order "
            f"(Maximum Roaming's {dataset_name} scripts use {MAXIMUM_ROAMING_BATCH_SIZE[dataset_name]})"
        )
    if any("legacy_sigmoid" in t.metric_options for t in task_list):
        report.settings["saliency_legacy_sigmoid"] = legacy_sigmoid
        report.notes.append(saliency_setting(legacy_sigmoid))
    n_boundary = len(dataset) if selection.ids is None else len(selection.ids)
    if has_edge and not use_seism:
        report.settings["boundary"] = {
            "subset": selection.name,
            "ids_file": str(selection.source) if selection.source else None,
            "n_images": n_boundary,
            "max_dist": None,
            "ground_truth": "the edge target (F_tol only)",
        }
        report.notes.append(
            f"edge: F_tol only (the training monitor on the edge targets), subset {selection.describe(len(dataset))}; "
            f"SEISM odsF/oisF/ap are defined for {', '.join(sorted(SEISM_GROUND_TRUTH))} only"
        )
    if use_seism:
        report.settings["boundary"] = {
            "subset": selection.name,
            "ids_file": str(selection.source) if selection.source else None,
            "n_images": n_boundary,
            "max_dist": MAX_DIST[dataset_name],
            "ground_truth": f"thin({SEISM_GROUND_TRUTH[dataset_name]})",
        }
        report.notes.append(
            f"edge odsF/oisF/ap: SEISM-equivalent against thin({SEISM_GROUND_TRUTH[dataset_name]}), maxDist "
            f"{MAX_DIST[dataset_name]} x diagonal, subset {selection.describe(len(dataset))}; "
            "F_tol: the training monitor on the training target, same subset"
        )

    report.problems = [*unknown_task_folders(pred_dir, loaded, dataset_name), *check_predictions(dataset, task_list, pred_dir)]
    if report.problems:
        return report
    evaluator = BoundaryEvaluator(MAX_DIST[dataset_name], workers=workers) if use_seism else None
    with Progress(console=console, transient=True, disable=console is None) as progress:
        pairs = _score_samples(
            dataset, task_list, pred_dir, metrics, selection, report.problems, progress, batch_size,
            seism=evaluator is not None,
        )
        counts = evaluator.evaluate_counts(pairs) if evaluator is not None else list(pairs)
    if report.problems:
        return report
    for task in task_list:
        values = {k: float(v) for k, v in metrics[task.name].compute().items()}
        if task.is_boundary and evaluator is not None:
            seism = summarize_images(evaluator.thresholds, counts)
            values = {"odsF": 100.0 * seism.ods_f, "oisF": 100.0 * seism.ois_f, "ap": 100.0 * seism.ap, **values}
        report.results[task.name] = values
        per_class = task.per_class_results(metrics[task.name])
        if per_class is not None:
            report.per_class_iou[task.name] = per_class
    return report
