"""Helpers shared by the metrics: threshold counting, safe division, state synchronisation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torchmetrics import Metric


def count_above(values: torch.Tensor, thresholds: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """Count, for every threshold, how many values lie above it, in one pass.

    Args:
        values: any shape, floating point.
        thresholds: ``(T,)`` sorted ascending, same dtype and device as ``values``.
        inclusive: count ``v >= t`` when true, ``v > t`` otherwise.

    Returns:
        ``(T,)`` int64 counts.
    """
    # bucket k holds the values lying above exactly the first k thresholds
    buckets = torch.bucketize(values.reshape(-1), thresholds, right=inclusive)
    hist = torch.bincount(buckets, minlength=thresholds.numel() + 1)
    return hist.flip(0).cumsum(0).flip(0)[1:]


def safe_div(num: torch.Tensor, den: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Element-wise ``num / den`` in float64, with ``fill`` where ``den == 0``."""
    num = num.double()
    den = den.double()
    return torch.where(den != 0, num / den.where(den != 0, torch.ones_like(den)), torch.full_like(den, fill))


@contextmanager
def synced_states(metric: Metric) -> Iterator[None]:
    """Give a public accessor of ``metric`` the split-wide (all-process) states.

    Outside ``compute`` this synchronises the states in a distributed run and restores the
    local ones afterwards; inside ``compute`` (states already synchronised) it does nothing.
    """
    fresh = not metric._is_synced
    with metric.sync_context(
        dist_sync_fn=metric.dist_sync_fn,
        should_sync=fresh and metric.sync_on_compute,
        should_unsync=fresh,
    ):
        yield
