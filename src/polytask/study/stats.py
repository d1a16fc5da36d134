"""Paired statistics of a study: Delta_m of an arm against the reference, seed by seed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from polytask.metrics.delta import delta_m

Results = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class PairedSummary:
    """Summary of per-seed values (e.g. Delta_m of an arm against the reference on the same seed).

    Attributes:
        values: the per-seed values, in seed order.
        mean: their mean.
        std: their sample standard deviation (NaN for one value).
        ci_low: lower end of the percentile-bootstrap interval of the mean (NaN for one value).
        ci_high: upper end of that interval.
        agree: how many seeds have the sign of the mean (a zero value agrees with nothing).
    """

    values: tuple[float, ...]
    mean: float
    std: float
    ci_low: float
    ci_high: float
    agree: int

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.values)


def paired_delta_m(
    arm: Mapping[int, Results], reference: Mapping[int, Results], directions: Mapping[str, Mapping[str, bool]]
) -> dict[int, float]:
    """Delta_m (percent) of ``arm`` against ``reference`` for every seed both have.

    A seed whose Delta_m is undefined (a reference metric of 0) gets NaN.

    Args:
        arm: ``{seed: {task: {metric: value}}}`` of the arm.
        reference: the same for the reference arm.
        directions: ``{task: {metric: higher_is_better}}``, the metrics that enter Delta_m.
    """
    out = {}
    for seed in sorted(arm):
        if seed not in reference:
            continue
        try:
            out[seed] = delta_m(arm[seed], reference[seed], directions)
        except ValueError:
            out[seed] = math.nan
    return out


def summarize_seeds(values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> PairedSummary:
    """Mean, sample std, percentile-bootstrap interval of the mean and sign agreement of ``values``.

    The interval resamples the seeds with replacement (``scipy.stats.bootstrap``, percentile
    method, a fixed random seed so a report is reproducible). With two seeds it is the range of
    the two values; with one seed it is undefined (NaN).

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("no values to summarize")
    data = np.asarray(values, dtype=np.float64)
    mean = float(data.mean())
    if len(data) < 2:
        std = low = high = math.nan
    else:
        std = statistics.stdev(data.tolist())
        if np.ptp(data) == 0:
            low = high = mean
        else:
            result = stats.bootstrap(
                (data,), np.mean, confidence_level=confidence, n_resamples=resamples,
                method="percentile", rng=np.random.default_rng(seed),
            )
            low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    sign = math.copysign(1.0, mean) if mean != 0 else 0.0
    agree = int(sum(1 for v in data if v != 0 and math.copysign(1.0, v) == sign))
    return PairedSummary(tuple(float(v) for v in data), mean, std, low, high, agree)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN std for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)
