"""Metric table on the terminal and a JSON file of the same numbers after validation and test."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

from polytask.utils.files import write_json_atomic
from polytask.utils.tables import metric_table


class MetricReport(pl.Callback):
    """Print the per-task metric table and write ``<log_dir>/<stage>_metrics.json``.

    During ``fit`` the table of the last validation (its epoch and step) is printed when training
    ends; the sanity check that Lightning runs on the untrained model before fitting is never
    reported, and when fit ran no validation of its own (e.g. ``max_steps`` reached before the end
    of the first epoch) it says so and writes no ``val_metrics.json``. ``validate`` and ``test``
    print theirs at the end of the run.

    Args:
        json_dir: directory of the JSON files (default: the trainer's log directory).
    """

    def __init__(self, json_dir: str | None = None) -> None:
        self.json_dir = json_dir
        self._fit_validation: tuple[int, int, dict[str, dict[str, float]]] | None = None

    def _report(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, epoch: int, step: int,
        results: Mapping[str, Mapping[str, float]] | None,
    ) -> None:
        out_dir = Path(self.json_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: all ranks
        self._write(pl_module, stage, epoch, step, results, out_dir)

    @rank_zero_only
    def _write(
        self, pl_module: pl.LightningModule, stage: str, epoch: int, step: int,
        results: Mapping[str, Mapping[str, float]] | None, out_dir: Path,
    ) -> None:
        if not results:
            return
        path = out_dir / f"{stage}_metrics.json"
        settings = getattr(pl_module, "evaluation_settings", dict)()
        write_json_atomic(path, {"stage": stage, "epoch": epoch, "step": step, "settings": settings, "results": results})
        console = Console()
        table = metric_table(results, f"{stage} metrics (epoch {epoch}, step {step})")
        if settings:
            table.caption = "; ".join(f"{k}: {v}" for k, v in settings.items())
        console.print(table)
        console.print(f"metrics written to {path}", soft_wrap=True)

    @staticmethod
    def _results(pl_module: pl.LightningModule, stage: str) -> dict[str, dict[str, float]] | None:
        return getattr(pl_module, "results", {}).get(stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_validation = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        results = self._results(pl_module, "val")
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, "val", *self._weights_position(trainer, pl_module), results)
        elif trainer.state.fn == "fit" and results:
            self._fit_validation = (trainer.current_epoch, trainer.global_step, results)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_validation is not None:
            self._report(trainer, pl_module, "val", *self._fit_validation)
        else:
            self._no_validation(trainer)

    @rank_zero_only
    def _no_validation(self, trainer: pl.Trainer) -> None:
        """Say that fit ran no validation (only the sanity check on the untrained model, if any)."""
        last = next((c.last_model_path for c in trainer.checkpoint_callbacks if getattr(c, "last_model_path", "")), None)
        evaluate = f"`polytask validate` with the same config and --ckpt_path {last}" if last else "`polytask validate`"
        Console().print(
            f"[yellow]fit ran no validation (it stopped at step {trainer.global_step}, before the first one; the "
            f"sanity check on the untrained model is no result): no val metrics written. Evaluate the final weights "
            f"with {evaluate}.[/yellow]"
        )

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, pl_module, "test", *self._weights_position(trainer, pl_module), self._results(pl_module, "test"))

    @staticmethod
    def _weights_position(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, int]:
        """Epoch and step of the weights ``validate`` / ``test`` evaluate: the checkpoint's own when one
        was loaded (the trainer's counters start at 0 outside fit), else the trainer's."""
        loaded = getattr(pl_module, "loaded_position", None)
        if trainer.state.fn != "fit" and loaded is not None:
            return loaded
        return trainer.current_epoch, trainer.global_step
