"""``polytask evaluate``: score saved prediction files against a dataset's ground truth."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from polytask.evaluation.evaluate import DATASETS, EvaluationReport, EvaluationSetupError, evaluate_predictions
from polytask.metrics import METRIC_PROTOCOLS
from polytask.utils.files import write_json_atomic
from polytask.utils.tables import metric_table


def render(report: EvaluationReport, console: Console) -> None:
    """Print the metric table (its caption states the settings) or the list of problems."""
    if not report.ok:
        console.print(
            f"{len(report.problems)} problem(s) with the predictions in {report.pred_dir} "
            f"({report.dataset} {report.split}); nothing was scored:",
            markup=False,
            highlight=False,
        )
        for line in report.problems:
            console.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        return
    table = metric_table(report.results, f"{report.dataset} {report.split}: {report.n_images} images from {report.pred_dir}")
    table.caption = "\n".join(report.notes) or None
    table.caption_justify = "left"
    console.print(table)
    for task, values in report.per_class_iou.items():
        console.print(per_class_table(task, values))


def per_class_table(task: str, values: dict[str, float]) -> Table:
    """One row per class of ``task``: its id, name and IoU (percent)."""
    title = f"{task}: IoU per class (%)"
    table = Table(title=title, min_width=len(title) + 2)
    table.add_column("id", justify="right")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for class_id, (name, iou) in enumerate(values.items()):
        table.add_row(str(class_id), name, f"{iou:.2f}")
    return table


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``polytask evaluate``."""
    parser = argparse.ArgumentParser(
        prog="polytask evaluate",
        description="Score saved predictions (PRED/<task>/<id>.png|.npy) against a dataset's ground truth.",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="benchmark, or folder (your own data, see polytask.yaml)")
    parser.add_argument("--root", required=True, type=Path, help="dataset directory")
    parser.add_argument("--pred-dir", required=True, type=Path, help="prediction folder")
    parser.add_argument(
        "--split",
        help="split whose ids and ground truth are used (default: the split polytask test reads: val; "
        "for folder, test when polytask.yaml or splits/test.txt gives one, else val)",
    )
    parser.add_argument("--tasks", nargs="+", help="tasks to score (default: all tasks of the dataset)")
    parser.add_argument(
        "--boundary-subset", choices=("all", "test_new"), default="all",
        help="images the boundaries are scored on: all, or SEISM's test_new (published PASCAL-Context numbers)",
    )
    parser.add_argument("--boundary-ids", type=Path, help="file of ids (one per line) the boundaries are scored on")
    parser.add_argument(
        "--legacy-sigmoid", action="store_true", help="saliency maxF with the InvPT-family sigmoid quirk (published numbers)"
    )
    parser.add_argument(
        "--protocol", choices=METRIC_PROTOCOLS, default="split_level",
        help="metric definitions: split_level (default) or maximum_roaming (Maximum Roaming's scripts; MTAN datasets)",
    )
    parser.add_argument(
        "--batch-size", type=int,
        help="maximum_roaming only: images per averaged batch (default: Maximum Roaming's, 2 NYUv2 / 8 Cityscapes)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes for the boundary evaluation")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    return parser


def main(args: Sequence[str]) -> int:
    """``polytask evaluate ...``: 0 when scored, 1 when prediction or ground-truth files have problems, 2 on bad arguments."""
    parsed = build_parser().parse_args(list(args))
    console = Console()
    try:
        report = evaluate_predictions(
            parsed.dataset,
            parsed.root,
            parsed.pred_dir,
            split=parsed.split,
            tasks=parsed.tasks,
            boundary_subset=parsed.boundary_subset,
            boundary_ids=parsed.boundary_ids,
            legacy_sigmoid=parsed.legacy_sigmoid,
            workers=parsed.workers,
            console=console,
            protocol=parsed.protocol,
            batch_size=parsed.batch_size,
        )
    except EvaluationSetupError as err:
        print(f"polytask evaluate: error: {err}", file=sys.stderr)
        return 2
    render(report, console)
    if not report.ok:
        return 1
    if parsed.json is not None:
        write_json_atomic(parsed.json, report.payload())
        console.print(f"results written to {parsed.json}", markup=False, highlight=False)
    return 0
