"""``polytask bench``: step time, memory, FLOPs and the ratios of one run."""

from polytask.bench import bench_main as main

__all__ = ["main"]
