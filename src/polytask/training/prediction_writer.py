"""Lightning callback saving test / predict predictions as files that ``polytask evaluate`` reads,
and as pictures people can look at.

Append it to a run from the command line::

    polytask test --config CFG --ckpt_path CKPT \\
        --trainer.callbacks+=polytask.training.prediction_writer.PredictionWriter \\
        --trainer.callbacks.out_dir PRED

(``--trainer.callbacks.<arg>`` right after ``+=`` sets an argument of the callback just appended.)
Besides the raw files ``PRED/<task>/<id>.*`` it writes a picture per sample,
``PRED/pictures/<id>.png`` (``--trainer.callbacks.pictures false`` / ``raw false`` turn either off).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image

from polytask.data.datamodule import MultiTaskDataModule
from polytask.data.transforms import denormalize
from polytask.evaluation.prediction_io import DepthFormat, has_file_format, prediction_path, write_prediction
from polytask.tasks import Task
from polytask.viz import prediction_grid

Stage = Literal["validate", "test", "predict"]
STAGES: tuple[str, ...] = ("validate", "test", "predict")
#: The sub-folder of ``out_dir`` holding the pictures.
PICTURES_DIR = "pictures"
#: zlib level of the pictures: PNG encoding dominates their cost, and level 1 encodes a 6-panel
#: 480x640 picture in about 0.12 s against 0.44 s at PIL's default 6, for about 25 % more bytes.
PNG_COMPRESS_LEVEL = 1


def batch_meta(outputs: Mapping[str, Any], batch_size: int) -> tuple[list[str], list[tuple[int, int]]]:
    """Ids and original ``(H, W)`` sizes of a batch's samples from its collated ``meta``.

    Args:
        outputs: a ``test_step`` / ``predict_step`` result with ``meta`` ``{"id": [B ids],
            "size": [tensor (B,) of heights, tensor (B,) of widths]}`` (the default collation of
            per-sample ``{"id": str, "size": (H, W)}``).
        batch_size: ``B``.

    Raises:
        ValueError: ``meta`` lacks ids or sizes, or their lengths differ from ``B``.
    """
    meta = outputs.get("meta") or {}
    ids, size = meta.get("id"), meta.get("size")
    if ids is None or size is None:
        raise ValueError(
            "PredictionWriter: the step output has no meta['id'] and meta['size']; the dataset must put "
            "{'id': str, 'size': (H, W)} into every sample's meta"
        )
    heights, widths = (torch.as_tensor(s).reshape(-1).tolist() for s in size)
    if not len(ids) == len(heights) == len(widths) == batch_size:
        raise ValueError(f"PredictionWriter: meta holds {len(ids)} ids and {len(heights)} sizes for a batch of {batch_size}")
    return [str(i) for i in ids], [(int(h), int(w)) for h, w in zip(heights, widths)]


def centre_crop(value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo :class:`polytask.data.transforms.Pad`: the ``(h, w)`` window it centred the sample in.

    Pad puts ``(H - h) // 2`` rows above and ``(W - w) // 2`` columns left of the sample.

    Args:
        value: ``(..., H, W)`` a padded prediction.
        size: ``(h, w)`` the original size, at most ``(H, W)``.
    """
    height, width = value.shape[-2:]
    h, w = size
    if h > height or w > width:
        raise ValueError(f"original size {h}x{w} exceeds the prediction's {height}x{width}; it was not padded")
    top, left = (height - h) // 2, (width - w) // 2
    return value[..., top : top + h, left : left + w]


def restore_image(image: torch.Tensor, size: tuple[int, int], resized: bool) -> torch.Tensor:
    """A de-normalised ``(3, H, W)`` input brought back to ``size`` as its predictions are:
    resized bilinearly when ``resized``, else :func:`centre_crop`."""
    if not resized:
        return centre_crop(image, size)
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0].clamp(0.0, 1.0)


def write_png(path: Path, picture: np.ndarray) -> Path:
    """Save an ``(H, W, 3)`` uint8 array as ``path`` (PNG): written under a temporary name in the
    same folder, then renamed over ``path``, so concurrent writers of the same file (distributed
    padding duplicates) never leave a partial one. No ``fsync`` and no removal of other temporary
    files (unlike :func:`polytask.utils.files.atomic_write`, whose clean-up would delete
    the temporary file of another process writing the same picture)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(picture).save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _batch_end_hook(stage: Stage) -> Callable[..., None]:
    """The Lightning ``on_<stage>_batch_end`` hook of :class:`PredictionWriter`.

    It saves the step output ``{task: (B, ...) prediction, "meta": ...}`` of every batch of a
    ``stage`` run that the writer is active in.
    """

    def on_batch_end(
        self: PredictionWriter,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._active(trainer, stage):
            self.write_batch(trainer, outputs, batch)

    return on_batch_end


class PredictionWriter(pl.Callback):
    """Save every dense task's predictions as ``out_dir/<task>/<id>.png|.npy``, and pictures.

    Formats are those of :mod:`polytask.evaluation.prediction_io`. Predictions are brought back
    to the sample's original size ``meta["size"]``: evaluation batches are centred in a padded
    canvas (:class:`polytask.data.transforms.Pad`), which is cropped away; images of a
    ``predict_dir`` resized to ``predict_size`` are resized back (labels nearest, the rest
    bilinear). Every process writes the samples of its own batches, each file under a temporary
    name and then renamed, so the duplicates a distributed sampler pads with never collide.

    Pictures: ``out_dir/pictures/<id>.png`` per sample (ids with ``/`` make sub-folders, as for
    the raw files), the de-normalised input then every saved task's ``colorize`` of its
    prediction, each titled, in one row (a grid beyond 4 panels; see
    :func:`polytask.viz.prediction_grid`), at the size of the raw files.

    Args:
        out_dir: the prediction folder ``PRED``.
        tasks: task names to save (default: every dense task of the model; image-level tasks
            have no file format and are named in a warning).
        stages: the runs that write: ``test``, ``predict`` and/or ``validate`` (a ``polytask
            validate`` run; the validation loops of ``fit`` never write).
        depth_format: ``npy`` (float32 metres) or ``png16`` (16-bit millimetres).
        raw: write the prediction files ``out_dir/<task>/...``.
        pictures: write the pictures ``out_dir/pictures/<id>.png``.

    Raises:
        ValueError: bad ``stages`` or ``depth_format``, or ``raw`` and ``pictures`` both false.
    """

    def __init__(
        self,
        out_dir: str,
        tasks: Sequence[str] | None = None,
        stages: Sequence[Stage] = ("test", "predict"),
        depth_format: DepthFormat = "npy",
        raw: bool = True,
        pictures: bool = True,
    ) -> None:
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ValueError(f"PredictionWriter: stages must be a non-empty subset of {list(STAGES)}, got {list(stages)}")
        if depth_format not in ("npy", "png16"):
            raise ValueError(f"PredictionWriter: depth_format must be 'npy' or 'png16', got {depth_format!r}")
        if not raw and not pictures:
            raise ValueError("PredictionWriter: raw and pictures are both false, so there is nothing to write; set one to true")
        self.out_dir = Path(out_dir).expanduser()
        self.task_names = list(tasks) if tasks is not None else None
        self.stages = tuple(stages)
        self.depth_format: DepthFormat = depth_format
        self.raw = raw
        self.pictures = pictures
        self.tasks: list[Task] = []
        self.written = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the tasks to save from the module's ``tasks``."""
        if not hasattr(pl_module, "tasks"):
            raise TypeError(f"PredictionWriter: {type(pl_module).__name__} has no `tasks`; it needs a polytask MultiTaskModule")
        available: list[Task] = list(pl_module.tasks)
        by_name = {t.name: t for t in available}
        if self.task_names is None:
            self.tasks = [t for t in available if has_file_format(t)]
            skipped = [t.name for t in available if not has_file_format(t)]
            if skipped:
                rank_zero_warn(f"PredictionWriter: image-level task(s) {skipped} have no prediction file format; not saved")
            self._check_pictures_dir()
            return
        unknown = [n for n in self.task_names if n not in by_name]
        if unknown:
            raise ValueError(f"PredictionWriter: task(s) {unknown} are not predicted by the model; it predicts {list(by_name)}")
        no_format = [n for n in self.task_names if not has_file_format(by_name[n])]
        if no_format:
            raise ValueError(f"PredictionWriter: image-level task(s) {no_format} have no prediction file format")
        self.tasks = [by_name[n] for n in self.task_names]
        self._check_pictures_dir()

    @property
    def pictures_dir(self) -> Path:
        """Where the pictures go: ``out_dir/pictures``."""
        return self.out_dir / PICTURES_DIR

    def _check_pictures_dir(self) -> None:
        """Refuse a saved task named like the pictures folder: its files would mix with the pictures."""
        if self.raw and self.pictures and any(t.name == PICTURES_DIR for t in self.tasks):
            raise ValueError(
                f"PredictionWriter: task {PICTURES_DIR!r} would write its files into the pictures folder "
                f"{self.pictures_dir}; set pictures=false or raw=false"
            )

    def _resized(self, trainer: pl.Trainer) -> bool:
        """Whether this run's inputs were resized (a ``predict_dir`` read at ``predict_size``)."""
        datamodule = trainer.datamodule
        return (
            trainer.state.fn == "predict"
            and isinstance(datamodule, MultiTaskDataModule)
            and datamodule.predict_dir is not None
            and datamodule.predict_size is not None
        )

    def write_batch(self, trainer: pl.Trainer, outputs: Mapping[str, Any], batch: Mapping[str, Any] | None = None) -> None:
        """Save the predictions of one step output ``{task: (B, ...) prediction, "meta": ...}``.

        Args:
            trainer: the running trainer (whether the inputs were resized depends on its run).
            outputs: the step output.
            batch: the step's batch; its ``image`` ``(B, 3, H, W)`` (normalised with the ImageNet
                mean and std) is the first panel of the pictures.

        Raises:
            ValueError: a prediction cannot be saved, or pictures are on and ``batch`` has no ``image``.
        """
        if not self.tasks:
            return
        batch_size = outputs[self.tasks[0].name].shape[0]
        ids, sizes = batch_meta(outputs, batch_size)
        resized = self._resized(trainer)
        images = None
        if self.pictures:
            images = batch.get("image") if batch is not None else None
            if images is None:
                raise ValueError(
                    "PredictionWriter: pictures need the batch's input images (batch['image']); pass the batch or set pictures=false"
                )
            images = denormalize(images.detach().cpu())
        panels: list[dict[str, np.ndarray]] = [{} for _ in ids]
        for task in self.tasks:
            values = outputs[task.name].detach().cpu()
            for sample_id, size, value, sample_panels in zip(ids, sizes, values, panels):
                value = task.resize_prediction(value, size) if resized else centre_crop(value, size)
                if self.raw:
                    try:
                        write_prediction(self.out_dir, task, sample_id, value, self.depth_format)
                    except ValueError as err:
                        raise ValueError(f"PredictionWriter: sample {sample_id!r}: {err}") from err
                if images is not None:
                    sample_panels[task.name] = task.colorize(value)
        if images is not None:
            for sample_id, size, image, sample_panels in zip(ids, sizes, images, panels):
                picture = prediction_grid(restore_image(image, size, resized), sample_panels)
                write_png(prediction_path(self.out_dir, PICTURES_DIR, sample_id, ".png"), picture)
        self.written += batch_size

    def _active(self, trainer: pl.Trainer, stage: Stage) -> bool:
        return stage in self.stages and trainer.state.fn == stage and not trainer.sanity_checking

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.written = 0

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.written = 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.written = 0

    on_test_batch_end = _batch_end_hook("test")
    on_predict_batch_end = _batch_end_hook("predict")
    on_validation_batch_end = _batch_end_hook("validate")

    def _report(self, trainer: pl.Trainer, stage: Stage) -> None:
        """Say where the predictions went (no collective call: other callbacks may hold rank 0)."""
        if not self._active(trainer, stage):
            return
        names = [t.name for t in self.tasks]
        where = f" by process 0 of {trainer.world_size}" if trainer.world_size > 1 else ""
        if self.raw:
            message = f"PredictionWriter: {names} predictions of {self.written} sample(s){where} written to {self.out_dir}"
            if self.pictures:
                message += f"; pictures (input and predictions side by side) in {self.pictures_dir}"
        else:
            message = (
                f"PredictionWriter: pictures of {names} predictions of {self.written} sample(s){where} "
                f"written to {self.pictures_dir}"
            )
        rank_zero_info(message)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "test")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "predict")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, "validate")
