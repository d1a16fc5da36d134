"""A callback that kills its process once, to test that an interrupted study run resumes.

Imported by the study worker processes of tests/test_study.py (the test puts this folder on
PYTHONPATH).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl


class ExitOnceAtStep(pl.Callback):
    """End the process abruptly (no clean-up, as a kill would) when ``global_step`` reaches ``step``,
    unless ``marker`` exists; creates ``marker`` first, so the next attempt runs through.

    Args:
        step: the optimizer step after which the process ends.
        marker: a file whose existence disarms the callback.
    """

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = Path(marker)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step and not self.marker.exists():
            self.marker.write_text("interrupted once\n")
            os._exit(3)
