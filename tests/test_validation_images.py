"""ValidationImages: input | target | prediction per dense task in TensorBoard at every validation;
LearningRateMonitor's learning rate in TensorBoard and in the CSV metrics."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_hard_sharing
from polytask.data.datasets.synthscenes import SynthScenesDataModule
from polytask.data.transforms import denormalize
from polytask.tasks import AttributeTask, DepthTask, NormalsTask, SaliencyTask, SegmentationTask, build_task
from polytask.training import MultiTaskModule, ValidationImages
from polytask.training.validation_images import PANEL_GAP, colorize_target, subsample_stride
from polytask.viz import image_to_uint8

TASKS = ["semseg", "depth", "normals", "sal", "human_parts"]  # human_parts targets hold 255 (ignored)
H, W = 32, 48
NUM_IMAGES = 5  # more than a batch (4): the samples come from the first two batches


def tiny_setup(cache: Path) -> tuple[MultiTaskModule, SynthScenesDataModule]:
    data = SynthScenesDataModule(TASKS, num_train=8, num_val=6, image_size=(H, W), cache_dir=str(cache), batch_size=4)
    net = tiny_hard_sharing()
    return MultiTaskModule(net=net, tasks=data.tasks, default_loss_weights=data.loss_weights), data


def trainer(root: Path, loggers: Any, callbacks: list[pl.Callback], **options: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def events(log_dir: str | Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def decode(event: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def panels(picture: np.ndarray) -> list[np.ndarray]:
    """Input, target and prediction panels of a ``W``-wide picture."""
    return [picture[:, i * (W + PANEL_GAP) : i * (W + PANEL_GAP) + W] for i in range(3)]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two epochs of two steps (validation after steps 2 and 4) after a two-batch sanity check."""
    root = tmp_path_factory.mktemp("fit")
    pl.seed_everything(0)
    model, data = tiny_setup(root / "cache")
    tb = TensorBoardLogger(root / "tb", name="run")
    csv_logger = CSVLogger(root / "csv", name="run")
    t = trainer(
        root,
        [tb, csv_logger],
        [ValidationImages(num_images=NUM_IMAGES), LearningRateMonitor()],
        max_epochs=2,
        num_sanity_val_steps=2,
        log_every_n_steps=1,
    )
    t.fit(model, datamodule=data)
    return SimpleNamespace(model=model, data=data, tb_dir=tb.log_dir, csv_dir=csv_logger.log_dir, root=root)


def test_every_dense_task_and_sample_gets_an_image_at_every_validation_but_the_sanity_check(fitted: SimpleNamespace) -> None:
    acc = events(fitted.tb_dir)
    expected = {f"val_images/{task}/{k}" for task in TASKS for k in range(NUM_IMAGES)}
    assert set(acc.Tags()["images"]) == expected
    for tag in expected:
        images = acc.Images(tag)
        assert [e.step for e in images] == [2, 4], "one image per validation at the global step; none at the sanity check"
        assert all((e.width, e.height) == (3 * W + 2 * PANEL_GAP, H) for e in images)


def test_panels_are_the_input_the_colorized_target_and_the_prediction(fitted: SimpleNamespace) -> None:
    model, data = fitted.model, fitted.data
    batches = list(data.val_dataloader())
    batch = {key: torch.cat([b[key] for b in batches]) for key in ["image", *TASKS]}
    model.eval()
    with torch.no_grad():
        outputs = model(batch["image"])
    acc = events(fitted.tb_dir)
    tasks = {t.name: t for t in model.tasks}
    for name in ("semseg", "human_parts", "depth"):
        task = tasks[name]
        for k in (0, NUM_IMAGES - 1):  # from the first and from the second batch
            picture = decode(acc.Images(f"val_images/{name}/{k}")[-1])  # the last validation: the final weights
            image, target, prediction = panels(picture)
            np.testing.assert_array_equal(image, image_to_uint8(denormalize(batch["image"][k])))
            np.testing.assert_array_equal(target, task.colorize(batch[name][k]))
            if name != "depth":  # a label map: exact (depth may move by rounding between runs)
                np.testing.assert_array_equal(prediction, task.colorize(task.postprocess(outputs[name])[k]))
            assert (picture[:, W : W + PANEL_GAP] == 255).all(), "a white gap between the panels"
    ignored = (batch["human_parts"][0] == 255).numpy()
    assert ignored.any()
    assert (panels(decode(acc.Images("val_images/human_parts/0")[-1]))[1][ignored] == 0).all(), "ignored pixels are black"


def test_learning_rate_monitor_writes_lr_to_tensorboard_and_csv(fitted: SimpleNamespace) -> None:
    scalars = events(fitted.tb_dir).Scalars("lr-Adam")
    assert [s.step for s in scalars] == [0, 1, 2, 3]
    assert scalars[0].value == pytest.approx(1e-3)
    with open(Path(fitted.csv_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("lr-Adam")]
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]
    assert float(rows[0]["lr-Adam"]) == pytest.approx(scalars[0].value)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_without_a_tensorboard_logger_it_says_so_once_and_logs_nothing(fitted: SimpleNamespace, tmp_path: Path) -> None:
    handler = Collect()
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero_logger.addHandler(handler)
    try:
        callback = ValidationImages(num_images=2)
        t = trainer(tmp_path, CSVLogger(tmp_path / "csv"), [callback], limit_val_batches=1)
        t.validate(fitted.model, datamodule=fitted.data, verbose=False)
        t.validate(fitted.model, datamodule=fitted.data, verbose=False)
    finally:
        rank_zero_logger.removeHandler(handler)
    assert sum("no TensorBoardLogger" in m for m in handler.messages) == 1
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_validate_logs_every_nth_validation(fitted: SimpleNamespace, tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path, name="val")
    t = trainer(tmp_path, [tb], [ValidationImages(num_images=1, every_n_validations=2)], limit_val_batches=1)
    for _ in range(3):
        t.validate(fitted.model, datamodule=fitted.data, verbose=False)
    acc = events(tb.log_dir)
    assert set(acc.Tags()["images"]) == {f"val_images/{task}/0" for task in TASKS}
    assert [e.step for e in acc.Images("val_images/semseg/0")] == [0, 0], "validations 1 and 3, at global step 0"


def test_image_level_tasks_are_skipped(tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path, name="mixed")
    t = trainer(tmp_path, [tb], [])
    tasks = [AttributeTask("attrs", ["a", "b"]), SegmentationTask("seg", 3)]
    module = SimpleNamespace(tasks=tasks)
    batch = {"image": torch.zeros(2, 3, 4, 6), "attrs": torch.ones(2, 2), "seg": torch.ones(2, 4, 6, dtype=torch.long)}
    outputs = {"attrs": torch.full((2, 2), 0.9), "seg": torch.zeros(2, 4, 6, dtype=torch.long)}
    callback = ValidationImages(num_images=2)
    callback.on_validation_epoch_start(t, module)
    callback.on_validation_batch_end(t, module, outputs, batch, 0)
    callback.on_validation_epoch_end(t, module)
    assert set(events(tb.log_dir).Tags()["images"]) == {"val_images/seg/0", "val_images/seg/1"}


def test_large_maps_are_thinned_to_max_side(tmp_path: Path) -> None:
    assert [subsample_stride(448, 576, m) for m in (None, 576, 320, 100)] == [1, 1, 2, 6]
    tb = TensorBoardLogger(tmp_path, name="thin")
    t = trainer(tmp_path, [tb], [])
    seg = SegmentationTask("seg", 4)
    module = SimpleNamespace(tasks=[seg])
    labels = torch.randint(0, 4, (3, 40, 60))
    labels[:, :5] = 255
    batch = {"image": torch.randn(3, 3, 40, 60), "seg": labels}
    outputs = {"seg": torch.randint(0, 4, (3, 40, 60))}
    callback = ValidationImages(num_images=1, max_side=20)  # stride 3: 14 x 20 panels
    callback.on_validation_epoch_start(t, module)
    callback.on_validation_batch_end(t, module, outputs, batch, 0)
    callback.on_validation_epoch_end(t, module)
    (event,) = events(tb.log_dir).Images("val_images/seg/0")
    assert (event.width, event.height) == (3 * 20 + 2 * PANEL_GAP, 14)
    picture = decode(event)
    np.testing.assert_array_equal(picture[:, :20], image_to_uint8(denormalize(batch["image"][0, :, ::3, ::3])))
    np.testing.assert_array_equal(picture[:, 22:42], seg.colorize(labels[0, ::3, ::3]))
    np.testing.assert_array_equal(picture[:, 44:], seg.colorize(outputs["seg"][0, ::3, ::3]))


def test_ignored_target_pixels_are_black_for_every_dense_kind() -> None:
    ignored = torch.zeros(4, 5, dtype=torch.bool)
    ignored[0, :] = True
    sal = torch.ones(4, 5, dtype=torch.long).masked_fill(ignored, 255)
    depth = torch.linspace(1.0, 3.0, 20).view(1, 4, 5).masked_fill(ignored, 255.0)
    normals = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 4, 5).masked_fill(ignored, 255.0)
    for task, target in ((SaliencyTask(), sal), (DepthTask(), depth), (NormalsTask(), normals)):
        rgb = colorize_target(task, target)
        assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
        assert (rgb[ignored.numpy()] == 0).all(), type(task).__name__
        assert (rgb[~ignored.numpy()] != 0).any(axis=-1).all(), type(task).__name__
    # the depth colour scale spans the valid depths only (255 does not stretch it)
    np.testing.assert_array_equal(colorize_target(DepthTask(), depth)[1:], DepthTask().colorize(depth[:, 1:]))
    seg = build_task("semseg", num_classes=3)
    labels = torch.tensor([[0, 1, 255], [2, 255, 0]])
    np.testing.assert_array_equal(colorize_target(seg, labels), seg.colorize(labels))


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="num_images"):
        ValidationImages(num_images=0)
    with pytest.raises(ValueError, match="every_n_validations"):
        ValidationImages(every_n_validations=0)
    with pytest.raises(ValueError, match="max_side"):
        ValidationImages(max_side=0)
