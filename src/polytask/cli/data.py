"""``polytask data check``: validate a dataset directory and list every problem."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import yaml
from rich.console import Console

from polytask.data.check import check_dataset
from polytask.data.registry import registry


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        options[key] = yaml.safe_load(value)
    return options


def main(args: Sequence[str]) -> int:
    """``polytask data check --dataset NAME --root DIR [--quick] [--set KEY=VALUE ...]``.

    Prints the report; returns 0 when the dataset is clean, 1 when problems were found.
    """
    parser = argparse.ArgumentParser(prog="polytask data", description="Dataset tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a dataset directory and list every problem")
    check.add_argument("--dataset", required=True, choices=sorted(registry()), help="dataset name")
    check.add_argument("--root", required=True, help="dataset directory")
    check.add_argument("--quick", action="store_true", help="header-level checks only (no label decoding)")
    check.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                       help="datamodule argument, e.g. --set num_classes=19 (repeatable)")
    check.add_argument("--max-rows", type=int, default=200, help="problems listed at most")
    parsed = parser.parse_args(list(args))
    report = check_dataset(parsed.dataset, parsed.root, full=not parsed.quick, options=_parse_options(parsed.options))
    report.render(Console(), max_rows=parsed.max_rows)
    return 0 if report.ok else 1
