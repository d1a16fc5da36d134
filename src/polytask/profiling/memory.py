"""Peak memory of one call (CUDA allocator or the torch profiler's CPU accounting) and the operators with most self time."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from polytask.profiling.timing import Variant, sync


def peak_memory_mb(run: Callable[[], None], device: torch.device) -> float:
    """Peak tensor memory (MiB) allocated by one call of ``run`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the torch profiler's CPU-allocator accounting
    (``Total Allocated`` of its memory events, relative to the start of the call).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), key=lambda e: e["ts"])
    if not memory:
        return 0.0
    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in memory) - base) / 2**20


def top_operators(variant: Variant, device: torch.device, count: int) -> list[dict[str, Any]]:
    """The ``count`` operators with the most self time in one profiled call of ``variant``.

    Returns:
        Rows ``{"op", "self_ms", "calls"}``, most expensive first (CPU self time; CUDA self time on GPUs).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    variant.prepare()
    with profile(activities=activities) as prof:
        variant.run()
        sync(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)[:count]
    return [{"op": e.key, "self_ms": getattr(e, attribute) / 1e3, "calls": e.count} for e in events]
