"""The benchmark report on the terminal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table


def render_report(report: Mapping[str, Any], console: Console) -> None:
    """Print the tables of a bench report."""
    summary = report["summary"]
    h, w = report["image_size"]
    header = (
        f"{report['model']} on {', '.join(report['configs']) or 'the defaults'}: {h}x{w}, batch {report['batch_size']}, "
        f"{summary['total_params'] / 1e6:.2f} M params, {summary['gflops']:.2f} GFLOPs/image"
    )
    if report.get("bare_summary"):
        bare = report["bare_summary"]
        header += f" (bare: {bare['total_params'] / 1e6:.2f} M, {bare['gflops']:.2f} GFLOPs)"
    for device in report["devices"]:
        table = Table(title=f"{header}\n{device['device_name']}")
        for column in ("net", "precision", "mode", "phase"):
            table.add_column(column)
        for column in ("median ms", "samples/s", "peak MiB"):
            table.add_column(column, justify="right")
        for r in device["results"]:
            mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            mode = "compiled" if r["compiled"] else "eager"
            table.add_row(r["net"], r["precision"], mode, r["phase"], f"{r['median_ms']:.1f}", f"{r['samples_per_s']:.1f}", mem)
        console.print(table)
        if device["ratios"]:
            ratio_table = Table(title="time ratios (same run)")
            ratio_table.add_column("ratio")
            ratio_table.add_column("value", justify="right")
            for name, value in device["ratios"].items():
                ratio_table.add_row(name, f"{value:.3f}")
            console.print(ratio_table)
        for key, rows in device.get("profiles", {}).items():
            ops = ", ".join(f"{r['op']} {r['self_ms']:.1f} ms ({r['calls']}x)" for r in rows)
            console.print(f"profile {key}: {ops}")
        unused = device.get("unused_parameters")
        if unused:
            console.print(f"{len(unused)} parameter tensors get no gradient in a training step (DDP: find_unused_parameters), e.g. {unused[:3]}")
        for what, reason in device["skipped"].items():
            console.print(f"[yellow]skipped {what}[/]: {reason}")
    loader = report.get("loader")
    if loader is not None:
        console.print(
            f"loader: {loader['samples_per_s']:.1f} samples/s ({loader['batches']} batches of {loader['batch_size']}, "
            f"{loader['num_workers']} workers, first batch {loader['first_batch_s']:.2f} s)"
        )
    for what, reason in report["skipped"].items():
        console.print(f"[yellow]skipped {what}[/]: {reason}")
    if "host_malloc" in report:
        console.print(f"host malloc: {report['host_malloc']} (polytask.utils.host_memory)")
    for note in report["notes"]:
        console.print(f"note: {note}")


def render_versus(report: Mapping[str, Any], console: Console) -> None:
    """Print the comparison table of a ``--versus`` report: both medians and their ratio per common variant."""
    versus = report["versus"]
    h, w = report["image_size"]
    title = (
        f"{versus['model']} ({', '.join(versus['configs'])}) versus {report['model']} "
        f"({', '.join(report['configs']) or 'the defaults'}): {h}x{w}, batch {report['batch_size']}, one interleaved run"
    )
    table = Table(title=title)
    for column in ("variant", "base ms", "versus ms", "versus / base"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in versus["comparison"]:
        table.add_row(row["key"], f"{row['base_median_ms']:.1f}", f"{row['versus_median_ms']:.1f}", f"{row['ratio']:.3f}")
    console.print(table)
    if not versus["comparison"]:
        console.print("[yellow]no variant ran on both sides[/]")
