"""Metric protocols: which definition of the metrics a table shows.

``split_level`` (the default) accumulates counts and sums over every pixel or image of the split
and computes each score once (:mod:`polytask.metrics`); ``maximum_roaming`` reproduces what the
evaluation loops of Maximum Roaming's scripts print (:mod:`polytask.metrics.maximum_roaming`):
per-image IoU and per-batch averages, so its numbers depend on the batch size.
"""

from __future__ import annotations

from typing import Literal, cast

MetricProtocol = Literal["split_level", "maximum_roaming"]
METRIC_PROTOCOLS: tuple[MetricProtocol, ...] = ("split_level", "maximum_roaming")

_DESCRIPTIONS: dict[MetricProtocol, str] = {
    "split_level": "split-level (counts and sums over the whole split, each score computed once)",
    "maximum_roaming": (
        "Maximum Roaming scripts (per-image IoU, averages of per-batch scores at the batch_size shown; "
        "see docs/evaluation.md)"
    ),
}


def check_protocol(protocol: str) -> MetricProtocol:
    """Return ``protocol`` if it names a metric protocol.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if protocol not in METRIC_PROTOCOLS:
        raise ValueError(f"unknown metric protocol {protocol!r}; known protocols: {list(METRIC_PROTOCOLS)}")
    return cast(MetricProtocol, protocol)


def protocol_setting(protocol: MetricProtocol) -> str:
    """One line naming the protocol, for table captions and JSON settings."""
    return f"protocol={protocol}: {_DESCRIPTIONS[check_protocol(protocol)]}"
