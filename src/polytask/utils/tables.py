"""Tables of metrics on the terminal."""

from __future__ import annotations

from collections.abc import Mapping

from rich.table import Table


def metric_table(results: Mapping[str, Mapping[str, float]], title: str) -> Table:
    """A rich table with one row per task and its metrics."""
    table = Table(title=title)
    table.add_column("task", style="bold")
    table.add_column("metrics")
    for task, values in results.items():
        table.add_row(task, "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
    return table
