"""The stacked task batch: its layout, and the :class:`TaskRouter` that says which task paths it holds.

A routed network runs the paths of ``n`` tasks in one call by stacking them along the batch
axis: a tensor ``(n B, C, H, W)`` holds the ``B`` images of task ``tasks[0]`` first, then those
of ``tasks[1]``, and so on. Per-task mode is the case ``n = 1``. The task-dependent layers
(task convolutions, task batch norms, task masks) share one :class:`TaskRouter` and read the
active tasks from it, so they also work inside host networks they did not write (timm).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class TaskRouter:
    """Holds the active task indices of the forward pass in progress.

    Args:
        num_tasks: ``T``, the number of task paths of the network.
    """

    def __init__(self, num_tasks: int) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self._active: tuple[int, ...] | None = None

    @property
    def active(self) -> tuple[int, ...]:
        """The task indices stacked in the current batch, in batch order."""
        if self._active is None:
            raise RuntimeError("a task-routed layer ran outside TaskRouter.route(...): the active tasks are unknown")
        return self._active

    @contextmanager
    def route(self, tasks: Sequence[int]) -> Iterator[None]:
        """Make ``tasks`` (distinct indices in ``0..T-1``) the active tasks within the block."""
        tasks = tuple(int(t) for t in tasks)
        if not tasks or len(set(tasks)) != len(tasks) or min(tasks) < 0 or max(tasks) >= self.num_tasks:
            raise ValueError(f"tasks must be distinct indices in 0..{self.num_tasks - 1}, got {tasks}")
        previous, self._active = self._active, tasks
        try:
            yield
        finally:
            self._active = previous


def blocks_to_channels(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(n B, C, *S)`` task blocks -> ``(B, n C, *S)``: task ``i`` at channels ``i C .. (i + 1) C - 1``."""
    nb, c, *spatial = x.shape
    return x.reshape(n, nb // n, c, *spatial).transpose(0, 1).reshape(nb // n, n * c, *spatial)


def channels_to_blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`blocks_to_channels`: ``(B, n C, *S)`` -> ``(n B, C, *S)``."""
    b, nc, *spatial = x.shape
    return x.reshape(b, n, nc // n, *spatial).transpose(0, 1).reshape(n * b, nc // n, *spatial)
