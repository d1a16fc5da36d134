"""Diagnostics of trained networks: expert usage of mixture-of-experts models, task interference."""

from polytask.diagnostics.expert_usage import (
    ExpertUsageMonitor,
    GateRecorder,
    GateUsage,
    dominant_expert_maps,
    plot_dominant_experts,
    plot_usage_heatmaps,
)
from polytask.diagnostics.interference import InterferenceStats, TaskInterference, pairwise, plot_interference

__all__ = [
    "ExpertUsageMonitor",
    "GateRecorder",
    "GateUsage",
    "InterferenceStats",
    "TaskInterference",
    "dominant_expert_maps",
    "pairwise",
    "plot_dominant_experts",
    "plot_interference",
    "plot_usage_heatmaps",
]
