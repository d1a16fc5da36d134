"""``polytask evaluate``: score saved prediction files against a benchmark's ground truth.

Ground truth is read by the dataset readers at the original resolution (no transform);
predictions by :mod:`polytask.evaluation.prediction_io`. Every task is scored by the metric its
:class:`~polytask.tasks.Task` builds for in-memory evaluation (saliency with the chosen
``legacy_sigmoid``), and boundaries additionally by the SEISM-equivalent
:class:`~polytask.evaluation.boundary.BoundaryEvaluator` (odsF / oisF / AP) as the dataset's
:class:`~polytask.data.protocols.BoundaryProtocol` says, on the chosen boundary subset.

What depends on the dataset is declared by its datamodule class (``prediction_files``,
``boundary_protocol``, ``maximum_roaming_batch_size``; see
:class:`~polytask.data.file_datamodule.FileDataModule`), found by name in
:func:`polytask.data.registry.registry`.

Segmentation tasks also get their per-class IoU under the split-level protocol, keyed by the class
names of the task the dataset builds (e.g. the ``classes`` of a folder dataset's ``polytask.yaml``).

``protocol="maximum_roaming"`` scores with the metrics of Maximum Roaming's scripts instead
(:mod:`polytask.metrics.maximum_roaming`), fed the split in file order in batches of the
scripts' batch size (the datamodule's ``maximum_roaming_batch_size``), as their evaluation loops are.

All prediction files are checked (presence, format, size) before anything is scored; every
problem is listed by file name and the command exits with status 1 without results. A folder of
the prediction directory that names no task of the dataset (other than the PredictionWriter's
``pictures``) is such a problem too.
"""

from __future__ import annotations

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
from polytask.data.protocols import BoundaryProtocol
from polytask.data.registry import registry
from polytask.evaluation.boundary import BoundaryEvaluator, segmentation_boundaries, summarize_images
from polytask.evaluation.prediction_io import PredictionFileError, probe_prediction, read_prediction
from polytask.metrics import MetricProtocol, check_protocol, protocol_setting
from polytask.tasks import Task

#: The datasets whose predictions can be scored from files (datamodule ``prediction_files``), in registry order.
DATASETS: tuple[str, ...] = tuple(name for name, module_class in registry().items() if module_class.prediction_files)
BoundarySubset = Literal["all", "test_new"]

#: Folders of a prediction directory that hold no task's predictions: the pictures the
#: PredictionWriter draws next to the prediction files (``PRED/pictures/<id>.png``).
NON_TASK_FOLDERS: frozenset[str] = frozenset({"pictures"})


def boundary_protocols() -> dict[str, BoundaryProtocol]:
    """The SEISM boundary protocol of each dataset of :data:`DATASETS` that declares one, by name."""
    declared = {name: registry()[name].boundary_protocol for name in DATASETS}
    return {name: protocol for name, protocol in declared.items() if protocol is not None}


def maximum_roaming_batch_sizes() -> dict[str, int]:
    """Maximum Roaming's batch size of each dataset of :data:`DATASETS` that declares one, by name."""
    declared = {name: registry()[name].maximum_roaming_batch_size for name in DATASETS}
    return {name: size for name, size in declared.items() if size is not None}


class EvaluationSetupError(ValueError):
    """The evaluation cannot start (bad arguments, unreadable dataset root or id list)."""


def saliency_setting(legacy_sigmoid: bool) -> str:
    """One line saying how saliency maxF treated the probabilities."""
    if legacy_sigmoid:
        return "sal maxF: legacy_sigmoid=on (sigmoid applied to the probabilities first, as the InvPT-family evaluations do)"
    return "sal maxF: legacy_sigmoid=off (probabilities thresholded as they are)"


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

    ``test_new`` is the subset of the dataset's :class:`~polytask.data.protocols.BoundaryProtocol`:

    * ``all`` without a file: every id of the split.
    * an id file: those ids; named ``test_new`` when the file is the protocol's published
      ``test_new`` list (recognised by its hash: SEISM's PASCAL-Context list), ``custom`` otherwise.
    * ``test_new`` where the protocol publishes a list: needs that list as the id file.
    * ``test_new`` where it does not (SEISM's NYUD ``test_new`` holds every val image): all val ids.

    Raises:
        EvaluationSetupError: ``test_new`` on a dataset without a boundary protocol or on another
            split, ``test_new`` without the published list, an unreadable or empty id file, or ids
            not in the split.
    """
    protocols = boundary_protocols()
    if subset == "test_new" and dataset_name not in protocols:
        raise EvaluationSetupError(
            f"boundary subset test_new is SEISM's list of {sorted(protocols)}, not of {dataset_name!r}; "
            "pass --boundary-ids FILE to score the boundaries of a subset"
        )
    if subset == "test_new" and split != "val":
        raise EvaluationSetupError(f"boundary subset test_new is part of the val split, not of {split!r}")
    published = protocols[dataset_name].test_new if dataset_name in protocols else None
    if ids_file is None:
        if subset == "all":
            return BoundarySelection("all")
        if published is None:
            return BoundarySelection("test_new")
        raise EvaluationSetupError(
            f"{published.dataset_title} boundary subset test_new needs its id list: pass --boundary-ids "
            f"{published.path} (see docs/evaluation.md)"
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
    seism = published is not None and published.matches(ids)
    if subset == "test_new" and published is not None and not seism:
        raise EvaluationSetupError(
            f"--boundary-ids: {ids_file} ({len(set(ids))} ids) is not SEISM's {published.dataset_title} test_new list "
            f"({published.size} ids, sha256 {published.sha256[:12]}...); drop --boundary-subset test_new "
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
    sizes = maximum_roaming_batch_sizes()
    if dataset_name not in sizes:
        raise EvaluationSetupError(
            f"protocol maximum_roaming is defined for {sorted(sizes)} (Maximum Roaming's "
            f"MTAN NYUv2 and Cityscapes), not for {dataset_name!r}"
        )
    if batch_size is not None and batch_size < 1:
        raise EvaluationSetupError(f"--batch-size must be >= 1, got {batch_size}")
    return batch_size or sizes[dataset_name]


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
            batch size of Maximum Roaming's scripts, the datamodule's ``maximum_roaming_batch_size``).

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
    seism_protocol = boundary_protocols().get(dataset_name) if has_edge else None
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
            f"(Maximum Roaming's {dataset_name} scripts use {maximum_roaming_batch_sizes()[dataset_name]})"
        )
    if any("legacy_sigmoid" in t.metric_options for t in task_list):
        report.settings["saliency_legacy_sigmoid"] = legacy_sigmoid
        report.notes.append(saliency_setting(legacy_sigmoid))
    n_boundary = len(dataset) if selection.ids is None else len(selection.ids)
    if has_edge and seism_protocol is None:
        report.settings["boundary"] = {
            "subset": selection.name,
            "ids_file": str(selection.source) if selection.source else None,
            "n_images": n_boundary,
            "max_dist": None,
            "ground_truth": "the edge target (F_tol only)",
        }
        report.notes.append(
            f"edge: F_tol only (the training monitor on the edge targets), subset {selection.describe(len(dataset))}; "
            f"SEISM odsF/oisF/ap are defined for {', '.join(sorted(boundary_protocols()))} only"
        )
    if seism_protocol is not None:
        report.settings["boundary"] = {
            "subset": selection.name,
            "ids_file": str(selection.source) if selection.source else None,
            "n_images": n_boundary,
            "max_dist": seism_protocol.max_dist,
            "ground_truth": f"thin({seism_protocol.ground_truth})",
        }
        report.notes.append(
            f"edge odsF/oisF/ap: SEISM-equivalent against thin({seism_protocol.ground_truth}), maxDist "
            f"{seism_protocol.max_dist} x diagonal, subset {selection.describe(len(dataset))}; "
            "F_tol: the training monitor on the training target, same subset"
        )

    report.problems = [*unknown_task_folders(pred_dir, loaded, dataset_name), *check_predictions(dataset, task_list, pred_dir)]
    if report.problems:
        return report
    evaluator = BoundaryEvaluator(seism_protocol.max_dist, workers=workers) if seism_protocol is not None else None
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
