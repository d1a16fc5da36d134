"""``polytask bench``: the command line of :mod:`polytask.profiling` (what is measured and how is
described there).

Usage::

    polytask bench --config configs/taskexpert_synthscenes.yaml --modes fp32,bf16 --compile --json out.json
    polytask bench --config CFG --image-size 224 224 -- --model.net.init_args.backbone vit_small_patch16_224
    polytask bench --config configs/hard_sharing_synthscenes.yaml --versus configs/etr_nlp_synthscenes.yaml --image-size 64 64

Arguments that are not bench options are config overrides, as on the ``fit`` command line (after a
``--`` separator, even those that look like bench options).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from polytask.cli.args import parse_tool_args
from polytask.profiling.experiment import (
    DataUnavailableError,
    Experiment,
    load_experiment,
)
from polytask.profiling.inputs import bench_inputs
from polytask.profiling.report import render_report, render_versus
from polytask.profiling.run import run_bench, run_versus
from polytask.profiling.timing import PRECISIONS
from polytask.utils.files import write_json_atomic


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polytask bench",
        description="Time training steps and inference, measure memory, parameters and FLOPs of a config's network.",
        epilog="Other arguments are config overrides, as for `polytask fit` (e.g. --model.init_args.net.init_args.width 64); "
        "after a `--` separator even those that look like bench options.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", action="append", default=[], help="config file; several are merged in order")
    parser.add_argument(
        "--versus", action="append", default=[], metavar="CONFIG",
        help="time this config (several are merged in order) against the --config ones in one interleaved run, "
        "at the same resolution and batch size; reports time(versus) / time(config) for every common variant",
    )
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="input resolution (default: the config's)")
    parser.add_argument(
        "--fallback-image-size", type=int, nargs=2, metavar=("H", "W"),
        help="resolution to assume when the config does not tell it (a dataset whose size comes from its absent files)",
    )
    parser.add_argument(
        "--max-pixels", type=int, help="without --image-size, scale a larger config resolution down to about this many pixels"
    )
    parser.add_argument("--batch-size", type=int, help="images per step (default: the config's batch_size)")
    parser.add_argument(
        "--device", action="append", choices=("cpu", "cuda"),
        help="device to run on; repeat for several (default: cuda when available, else cpu)",
    )
    parser.add_argument("--modes", default="fp32", help="comma-separated precisions: fp32, bf16 (default: fp32)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant before timing")
    parser.add_argument("--loader-batches", type=int, default=10, help="training-loader batches to time (0: skip)")
    parser.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True, help="time the bare backbone + Conv1x1 heads too")
    parser.add_argument("--threads", type=int, help="torch CPU threads during the run (default: torch's, one per core)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory (one profiled call per variant)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="record the N operators with most self time per variant")
    parser.add_argument("--json", type=Path, help="write the report to this JSON file")
    return parser


def main(args: Sequence[str]) -> int:
    """``polytask bench``: benchmark the network of a config and print (and optionally save) the report.

    The JSON report holds ``configs``, ``model``, ``tasks``, ``image_size``, ``batch_size``,
    ``summary`` and ``bare_summary`` (parameters, FLOPs), ``loader`` (samples/s or null), ``notes``,
    ``skipped`` (what was not measured and why) and ``devices``: per device its ``results`` (one
    row per variant: ``median_ms``, ``samples_per_s``, ``peak_mem_mb``, the raw ``times_ms``...),
    ``ratios`` and ``skipped``. With ``--versus`` (one device), ``versus`` holds the other side's
    report (same fields: its ``configs``, ``summary``, ``devices``...) plus ``comparison`` (per
    common variant: ``key``, ``base_median_ms``, ``versus_median_ms``, ``ratio``) and ``ratios``
    (``versus_over_base/<net>/<precision>/<eager|compiled>/<phase>``: time(versus) / time(base),
    medians of the same interleaved run).

    Returns:
        The exit status: 0, or 2 when nothing could be measured (a datamodule that needs its
        absent files even to tell its tasks; the reason is printed and is the JSON's ``skipped.bench``).
    """
    args = list(args)
    # the profiler's library (Kineto) logs GPU probing errors on CPU-only machines; a user's own level wins
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    options, overrides = parse_tool_args(_parser(), args)
    precisions = [p.strip() for p in options.modes.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise SystemExit(f"polytask bench: unknown mode(s) {unknown}; choose from {list(PRECISIONS)}")
    devices = options.device or ["cuda" if torch.cuda.is_available() else "cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("polytask bench: --device cuda, but CUDA is not available")
    if options.versus and len(devices) > 1:
        raise SystemExit("polytask bench: --versus compares two configs on one device; give one --device")
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        return _bench(options, overrides, precisions, devices)
    finally:
        torch.set_num_threads(threads)


def _bench(options: argparse.Namespace, overrides: list[str], precisions: list[str], devices: list[str]) -> int:
    """Build, measure, print and save; the exit status of :func:`main`."""
    loader_batches = max(0, options.loader_batches)
    try:
        experiment = load_experiment(
            options.config,
            overrides,
            image_size=options.image_size,
            batch_size=options.batch_size,
            loader_batches=loader_batches,
            max_pixels=options.max_pixels,
        )
    except DataUnavailableError as err:
        Console().print(f"[yellow]skipped[/]: {err}")
        if options.json is not None:
            write_json_atomic(options.json, {"configs": options.config, "overrides": overrides, "skipped": {"bench": str(err)}})
        return 2
    if options.versus:
        return _bench_versus(options, overrides, precisions, devices[0], experiment, loader_batches)
    report = run_bench(
        experiment, devices, precisions, options.compile, options.warmup, options.steps, loader_batches, options.bare,
        options.memory, options.fallback_image_size, options.profile,
    )
    render_report(report, Console())
    if options.json is not None:
        write_json_atomic(options.json, report)
        Console().print(f"report written to {options.json}")
    return 0


def _bench_versus(
    options: argparse.Namespace,
    overrides: list[str],
    precisions: list[str],
    device: str,
    base: Experiment,
    loader_batches: int,
) -> int:
    """``--versus``: the other side built at the base's resolution and batch size, both timed in one run."""
    base_inputs = bench_inputs(base, loader_batches, options.bare, options.fallback_image_size, options.warmup, options.steps)
    try:
        other = load_experiment(
            options.versus, overrides, image_size=base_inputs.report["image_size"], batch_size=base.batch_size,
            loader_batches=loader_batches,
        )
    except DataUnavailableError as err:
        Console().print(f"[yellow]skipped[/]: --versus: {err}")
        if options.json is not None:
            skipped = {"configs": options.versus, "overrides": overrides, "skipped": {"bench": str(err)}}
            write_json_atomic(options.json, {**base_inputs.report, "versus": skipped})
        return 2
    other_inputs = bench_inputs(other, loader_batches, options.bare, options.fallback_image_size, options.warmup, options.steps)
    report = run_versus(
        base, base_inputs, other, other_inputs, device, precisions, options.compile, options.warmup, options.steps,
        options.bare, options.memory, options.profile,
    )
    console = Console()
    render_report(report, console)
    render_report(report["versus"], console)
    render_versus(report, console)
    if options.json is not None:
        write_json_atomic(options.json, report)
        console.print(f"report written to {options.json}")
    return 0
