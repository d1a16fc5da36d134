"""Multi-task gain Delta_m relative to single-task references."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from numbers import Real


def _lookup(table: Mapping[str, Mapping[str, float]], name: str, task: str, metric: str) -> float:
    if task not in table:
        raise KeyError(f"task {task!r} missing from {name}")
    if metric not in table[task]:
        raise KeyError(f"metric {metric!r} of task {task!r} missing from {name}")
    return float(table[task][metric])


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    reference: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]],
) -> float:
    """Delta_m in percent: the mean over tasks of each task's mean relative change.

    ``Delta_m = 100 / T * sum_t mean_m (-1)^l (M - M_ref) / M_ref`` with ``l = 1`` where lower
    is better, so a positive value is an improvement over the references. Exactly the tasks
    and metrics named in ``higher_is_better`` count; extra entries in ``results`` or
    ``reference`` are ignored.

    Args:
        results: ``{task: {metric: value}}`` of the model under test.
        reference: ``{task: {metric: value}}`` of the single-task baselines.
        higher_is_better: ``{task: {metric: bool}}``, the metrics that enter the average.

    Raises:
        KeyError: a counted task or metric is missing from ``results`` or ``reference``.
        ValueError: nothing to average, or a reference value is zero.
    """
    if not higher_is_better:
        raise ValueError("higher_is_better names no task")
    task_gains = []
    for task, directions in higher_is_better.items():
        if not directions:
            raise ValueError(f"higher_is_better names no metric for task {task!r}")
        gains = []
        for metric, higher in directions.items():
            value = _lookup(results, "results", task, metric)
            ref = _lookup(reference, "reference", task, metric)
            if ref == 0:
                raise ValueError(f"reference value of {task}/{metric} is 0; the relative change is undefined")
            sign = 1.0 if higher else -1.0
            gains.append(sign * (value - ref) / ref)
        task_gains.append(sum(gains) / len(gains))
    return 100.0 * sum(task_gains) / len(task_gains)


def load_reference(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Read a single-task reference file ``{"task": {"metric": value}}`` (JSON).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, a different structure, or a non-numeric / non-finite value;
            every message names the file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"reference file not found: {os.fspath(path)}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"reference file {os.fspath(path)} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"reference file {os.fspath(path)} must hold an object {{task: {{metric: value}}}}")
    reference: dict[str, dict[str, float]] = {}
    for task, metrics in data.items():
        if not isinstance(metrics, dict):
            raise ValueError(f"reference file {os.fspath(path)}: task {task!r} must map metric names to numbers")
        reference[task] = {}
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"reference file {os.fspath(path)}: {task}/{metric} is {value!r}, not a finite number")
            reference[task][metric] = float(value)
    return reference
