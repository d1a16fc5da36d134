"""Diagnostics of trained networks: expert usage of mixture-of-experts models."""

from polytask.diagnostics.expert_usage import (
    ExpertUsageMonitor,
    GateRecorder,
    GateUsage,
    dominant_expert_maps,
    plot_dominant_experts,
    plot_usage_heatmaps,
)

__all__ = [
    "ExpertUsageMonitor",
    "GateRecorder",
    "GateUsage",
    "dominant_expert_maps",
    "plot_dominant_experts",
    "plot_usage_heatmaps",
]
