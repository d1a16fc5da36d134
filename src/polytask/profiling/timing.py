"""Interleaved timing of benchmark variants and the ratios of their medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS = ("fp32", "bf16")


@dataclass
class Variant:
    """One timed configuration: which network, precision, eager or compiled, training or inference."""

    net: str
    precision: str
    compiled: bool
    phase: str
    prepare: Callable[[], None]
    run: Callable[[], None]

    @property
    def key(self) -> str:
        """``net/precision/eager|compiled/phase``."""
        return f"{self.net}/{self.precision}/{'compiled' if self.compiled else 'eager'}/{self.phase}"


@dataclass
class Result:
    """Measured times (seconds) and peak memory of one variant."""

    net: str
    precision: str
    compiled: bool
    phase: str
    times_s: list[float]
    batch_size: int
    peak_mem_mb: float | None = None

    @property
    def key(self) -> str:
        return f"{self.net}/{self.precision}/{'compiled' if self.compiled else 'eager'}/{self.phase}"

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / self.median_s

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON (times in milliseconds)."""
        return {
            "key": self.key,
            "net": self.net,
            "precision": self.precision,
            "compiled": self.compiled,
            "phase": self.phase,
            "median_ms": 1e3 * self.median_s,
            "min_ms": 1e3 * min(self.times_s),
            "times_ms": [1e3 * t for t in self.times_s],
            "samples_per_s": self.samples_per_s,
            "peak_mem_mb": self.peak_mem_mb,
        }


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_line(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def time_interleaved(
    variants: Sequence[Variant], warmup: int, repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Warm every variant up, then time ``repeats`` interleaved rounds of one call per variant.

    A variant that raises (e.g. torch.compile without a C++ compiler) is dropped from then on.

    Returns:
        Seconds per call of every variant that ran through, and the error of every variant that
        failed, by variant key.
    """
    failed: dict[str, str] = {}
    ready: list[Variant] = []
    for variant in variants:
        try:
            for _ in range(warmup):
                variant.prepare()
                variant.run()
            ready.append(variant)
        except Exception as err:  # noqa: BLE001 - reported as a skipped variant
            failed[variant.key] = error_line(err)
    times: dict[str, list[float]] = {v.key: [] for v in ready}
    for round_ in range(repeats):
        for i in range(len(ready)):
            variant = ready[(round_ + i) % len(ready)]
            if variant.key in failed:
                continue
            variant.prepare()
            sync(device)
            start = time.perf_counter()
            try:
                variant.run()
            except Exception as err:  # noqa: BLE001 - reported as a skipped variant
                failed[variant.key] = error_line(err)
                continue
            sync(device)
            times[variant.key].append(time.perf_counter() - start)
    return {k: v for k, v in times.items() if k not in failed}, failed


def ratios(results: Sequence[Result]) -> dict[str, float]:
    """Time ratios of medians measured in the same run (above 1: the first variant is slower).

    ``model_over_bare``, ``per_task_over_batched``, ``compiled_over_eager`` and ``bf16_over_fp32``,
    each keyed by the variant fields they hold fixed.
    """
    by_key = {r.key: r.median_s for r in results}
    out: dict[str, float] = {}

    def add(name: str, slow: str, fast: str) -> None:
        if slow in by_key and fast in by_key:
            out[name] = by_key[slow] / by_key[fast]

    for r in results:
        mode = "compiled" if r.compiled else "eager"
        if r.net == "model":
            add(f"model_over_bare/{r.precision}/{mode}/{r.phase}", r.key, f"bare/{r.precision}/{mode}/{r.phase}")
            add(f"per_task_over_batched/{r.precision}/{mode}/{r.phase}", f"per_task/{r.precision}/{mode}/{r.phase}", r.key)
        if r.compiled:
            add(f"compiled_over_eager/{r.net}/{r.precision}/{r.phase}", r.key, f"{r.net}/{r.precision}/eager/{r.phase}")
        if r.precision == "bf16":
            add(f"bf16_over_fp32/{r.net}/{mode}/{r.phase}", r.key, f"{r.net}/fp32/{mode}/{r.phase}")
    return out
