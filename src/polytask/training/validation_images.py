"""A few validation samples per task in TensorBoard: input | target | prediction, every validation.

:class:`ValidationImages` copies the first ``num_images`` samples of the first validation
batch(es) to the CPU (once per validation, global rank 0 only), draws one picture per dense task
and sample with the task's own :meth:`~polytask.tasks.Task.colorize`, and adds it to every
:class:`~lightning.pytorch.loggers.TensorBoardLogger` of the trainer as
``val_images/<task>/<k>`` at the global step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from polytask.data.transforms import denormalize
from polytask.constants import IGNORE_INDEX
from polytask.tasks import Task
from polytask.viz import image_to_uint8

TAG_PREFIX = "val_images"
"""Tags are ``<TAG_PREFIX>/<task>/<k>``, ``k`` the sample's position (0 .. num_images - 1)."""

PANEL_GAP = 2
"""Width in pixels of the white column between the input, target and prediction panels."""


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    """The trainer's TensorBoard loggers, in order (other loggers are left out)."""
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def ignored_pixels(target: torch.Tensor) -> np.ndarray:
    """``(H, W)`` bool: pixels whose target is ``IGNORE_INDEX`` (255) in every channel.

    A target is ``(H, W)`` or ``(C, H, W)`` (on the CPU); padding and unlabelled pixels carry 255
    in every channel for every dense task (segmentation, saliency, edges, normals, depth).
    """
    ignored = target.numpy() == IGNORE_INDEX
    return ignored.all(axis=0) if ignored.ndim == 3 else ignored


def colorize_target(task: Task, target: torch.Tensor) -> np.ndarray:
    """``task.colorize`` of one target (on the CPU) with its ignored pixels black.

    Ignored values are replaced by 0 before colourising, so that 255 does not enter a colour
    scale (depth is scaled to its valid range), then painted black. For label maps this is
    exactly ``task.colorize(target)`` (which already paints 255 black).
    """
    ignored = ignored_pixels(target)
    if not ignored.any():
        return task.colorize(target)
    values = target.numpy()
    rgb = task.colorize(torch.from_numpy(np.where(ignored, 0, values).astype(values.dtype))).copy()
    rgb[ignored] = 0
    return rgb


def side_by_side(panels: Sequence[np.ndarray], gap: int = PANEL_GAP) -> np.ndarray:
    """``(H, W_1 + gap + W_2 + ...)`` uint8 RGB: the panels left to right, top-aligned, a white gap
    between them; a panel lower than the highest is padded with black below."""
    height = max(p.shape[0] for p in panels)
    columns: list[np.ndarray] = []
    for i, panel in enumerate(panels):
        if i:
            columns.append(np.full((height, gap, 3), 255, dtype=np.uint8))
        if panel.shape[0] < height:
            panel = np.concatenate([panel, np.zeros((height - panel.shape[0],) + panel.shape[1:], np.uint8)])
        columns.append(panel.astype(np.uint8, copy=False))
    return np.concatenate(columns, axis=1)


def subsample_stride(height: int, width: int, max_side: int | None) -> int:
    """The smallest integer stride that brings a ``height x width`` map to at most ``max_side`` per side."""
    return 1 if max_side is None else max(1, math.ceil(max(height, width) / max_side))


def _head(value: torch.Tensor, n: int, max_side: int | None) -> torch.Tensor:
    """The first ``n`` maps of a batched ``(B, ..., H, W)`` tensor, every ``s``-th row and column
    (:func:`subsample_stride`), detached, copied to the CPU (a copy also for a CPU tensor: no view
    keeps the batch alive)."""
    stride = subsample_stride(value.shape[-2], value.shape[-1], max_side)
    return value[:n, ..., ::stride, ::stride].detach().to("cpu", copy=True).contiguous()


class ValidationImages(pl.Callback):
    """Log ``num_images`` validation samples per dense task to TensorBoard at every validation.

    At every validation of ``fit`` (never the sanity check) and in ``validate``, the first
    ``num_images`` samples of the first validation batch(es) of the first validation dataloader
    are drawn, one picture per dense task (``task.dense``) and sample: the input image
    (de-normalised with the ImageNet statistics), the target and the prediction side by side,
    :data:`PANEL_GAP` white pixels apart. Panels use the task's own ``colorize``; ignored target
    pixels (255) are black. Image-level tasks (attributes, classification) are skipped.

    Each picture goes to every TensorBoard logger of the trainer with ``add_image`` as
    ``val_images/<task>/<k>`` (``k`` = 0 .. num_images - 1) at ``trainer.global_step``; other
    loggers are skipped. Without a TensorBoard logger the callback says so once and does nothing.

    Only global rank 0 copies samples and logs; the callback runs no collective operation (under
    DDP the samples are the first ones of rank 0's shard). The module must have a ``tasks`` list and
    its ``validation_step`` must return the post-processed predictions by task name, as
    :class:`~polytask.training.MultiTaskModule` does.

    Cost: the samples are copied once per validation; larger maps are first thinned to every
    ``s``-th row and column, ``s`` the smallest integer stride that brings both sides to at most
    ``max_side`` (nearest neighbour: label colours stay exact), which bounds the drawing, the PNG
    encoding and the event file. Measured on a busy 2-core CPU with six tasks and four samples:
    64x96 maps 0.1-0.4 s and 0.2 MB per validation; 448x576 maps 1-2.5 s and 4 MB at the default
    ``max_side`` (thinned to 224x288), 5-9 s and 11 MB at full resolution.

    Args:
        num_images: samples per task and validation.
        every_n_validations: log at the 1st, (1 + n)th, (1 + 2n)th... validation; the count is
            kept in checkpoints, so a resumed run keeps its rhythm.
        max_side: longest side of a panel before thinning (None: full resolution).
    """

    def __init__(self, num_images: int = 4, every_n_validations: int = 1, max_side: int | None = 320) -> None:
        if int(num_images) < 1:
            raise ValueError(f"ValidationImages: num_images must be at least 1, got {num_images}")
        if int(every_n_validations) < 1:
            raise ValueError(f"ValidationImages: every_n_validations must be at least 1, got {every_n_validations}")
        if max_side is not None and int(max_side) < 1:
            raise ValueError(f"ValidationImages: max_side must be at least 1 or None, got {max_side}")
        self.num_images = int(num_images)
        self.every_n_validations = int(every_n_validations)
        self.max_side = None if max_side is None else int(max_side)
        self.validations = 0
        """Validations seen so far (sanity checks excluded)."""
        self._active = False
        self._tasks: list[Task] = []
        self._images: list[torch.Tensor] = []
        self._targets: dict[str, list[torch.Tensor]] = {}
        self._preds: dict[str, list[torch.Tensor]] = {}
        self._said: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_images=self.num_images, every_n_validations=self.every_n_validations)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))

    def _say_once(self, key: str, message: str, warn: bool = False) -> None:
        if key not in self._said:
            self._said.add(key)
            (rank_zero_warn if warn else rank_zero_info)(message)

    def _reset(self) -> None:
        self._active = False
        self._tasks = []
        self._images = []
        self._targets = {}
        self._preds = {}

    @property
    def _collected(self) -> int:
        return sum(image.shape[0] for image in self._images)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        if trainer.sanity_checking:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_validations or not trainer.is_global_zero:
            return
        if not tensorboard_loggers(trainer):
            self._say_once("no_tb", "ValidationImages: the trainer has no TensorBoardLogger; no validation images are logged")
            return
        tasks = getattr(pl_module, "tasks", None)
        if not isinstance(tasks, Sequence) or not all(isinstance(t, Task) for t in tasks):
            self._say_once("no_tasks", f"ValidationImages: {type(pl_module).__name__} has no `tasks` list; nothing logged", True)
            return
        self._tasks = [t for t in tasks if t.dense]
        self._active = bool(self._tasks)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != 0:
            return
        if not isinstance(batch, Mapping) or "image" not in batch:
            self._say_once("no_image", "ValidationImages: validation batches have no 'image'; nothing logged", True)
            self._reset()
            return
        take = min(self.num_images - self._collected, int(batch["image"].shape[0]))
        if take <= 0:
            return
        if not isinstance(outputs, Mapping):
            self._say_once("no_outputs", "ValidationImages: validation_step returns no predictions by task; nothing logged", True)
            self._reset()
            return
        self._images.append(_head(batch["image"], take, self.max_side))
        for task in self._tasks:
            if task.name in batch and task.name in outputs:
                self._targets.setdefault(task.name, []).append(_head(batch[task.name], take, self.max_side))
                self._preds.setdefault(task.name, []).append(_head(outputs[task.name], take, self.max_side))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active or not self._images:
            self._reset()
            return
        try:
            self._log(trainer)
        finally:
            self._reset()

    def _log(self, trainer: pl.Trainer) -> None:
        """Draw and add the pictures of the samples collected in this validation (rank 0 only)."""
        images = torch.cat(self._images)
        inputs = [image_to_uint8(denormalize(image)) for image in images]
        writers = [logger.experiment for logger in tensorboard_loggers(trainer)]
        step = trainer.global_step
        for task in self._tasks:
            if task.name not in self._targets:
                continue
            targets, preds = torch.cat(self._targets[task.name]), torch.cat(self._preds[task.name])
            for k in range(images.shape[0]):
                picture = side_by_side([inputs[k], colorize_target(task, targets[k]), task.colorize(preds[k])])
                for writer in writers:
                    writer.add_image(f"{TAG_PREFIX}/{task.name}/{k}", picture, step, dataformats="HWC")
        for writer in writers:
            writer.flush()
