"""Metric table on the terminal and a JSON file of the same numbers after validation and test."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table

from polytask.training.checkpoint import atomic_write


def metric_table(results: Mapping[str, Mapping[str, float]], title: str) -> Table:
    """A rich table with one row per task and its metrics."""
    table = Table(title=title)
    table.add_column("task", style="bold")
    table.add_column("metrics")
    for task, values in results.items():
        table.add_row(task, "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
    return table


def write_json_atomic(path: Path, payload: object) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2).encode()
    atomic_write(path, lambda f: f.write(text))


class MetricReport(pl.Callback):
    """Print the per-task metric table and write ``<log_dir>/<stage>_metrics.json``.

    During ``fit`` the table of the last validation is printed when training ends; ``validate``
    and ``test`` print theirs at the end of the run.

    Args:
        json_dir: directory of the JSON files (default: the trainer's log directory).
    """

    def __init__(self, json_dir: str | None = None) -> None:
        self.json_dir = json_dir

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        out_dir = Path(self.json_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: all ranks
        self._write(trainer, pl_module, stage, out_dir)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, out_dir: Path) -> None:
        results = getattr(pl_module, "results", {}).get(stage)
        if not results:
            return
        path = out_dir / f"{stage}_metrics.json"
        settings = getattr(pl_module, "evaluation_settings", dict)()
        write_json_atomic(
            path,
            {"stage": stage, "epoch": trainer.current_epoch, "step": trainer.global_step, "settings": settings, "results": results},
        )
        console = Console()
        table = metric_table(results, f"{stage} metrics (epoch {trainer.current_epoch}, step {trainer.global_step})")
        if settings:
            table.caption = "; ".join(f"{k}: {v}" for k, v in settings.items())
        console.print(table)
        console.print(f"metrics written to {path}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self._report(trainer, pl_module, "val")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "test")
