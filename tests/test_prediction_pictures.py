"""Pictures of predictions written by PredictionWriter: one titled grid per sample, the input then
every task's colourisation, at the size of the raw prediction files."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import tiny_hard_sharing
from polytask.constants import IMAGENET_MEAN, IMAGENET_STD
from polytask.data.datasets.synthscenes import SynthScenesDataModule
from polytask.evaluation.prediction_io import read_prediction
from polytask.tasks import Task, build_task
from polytask.training.module import MultiTaskModule
from polytask.training.prediction_writer import PredictionWriter
from polytask.viz import GRID_GAP, grid_layout, prediction_grid

PADDED = (20, 24)  # the batch's canvas
SIZES = [(17, 21), (20, 24), (12, 9)]  # original sizes: odd and no padding, and a small one
IDS = ["2008_000001", "sub/dir/b", "c"]
TASKS: list[Task] = [
    build_task("semseg", num_classes=5),
    build_task("depth"),
    build_task("normals"),
    build_task("edge"),
    build_task("sal"),
]
TITLES = ["input"] + [t.name for t in TASKS]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared machine
    yield
    torch.set_num_threads(threads)


class FixedPredictions(pl.LightningModule):
    """Predicts what the batch carries under ``pred`` (postprocessed, like MultiTaskModule.predict_step)."""

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__()
        self.tasks = tasks
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {**batch["pred"], "meta": batch["meta"]}


def make_batch(seed: int = 0) -> dict[str, Any]:
    """A collated batch of 3 samples padded to PADDED: normalised images and random predictions."""
    g = torch.Generator().manual_seed(seed)
    b, (h, w) = len(IDS), PADDED
    return {
        "image": torch.randn((b, 3, h, w), generator=g) * 1.5,  # some pixels leave [0, 1] once de-normalised
        "pred": {
            "semseg": torch.randint(0, 5, (b, h, w), generator=g),
            "depth": 10 * torch.rand((b, 1, h, w), generator=g),
            "normals": torch.nn.functional.normalize(torch.randn((b, 3, h, w), generator=g), dim=1),
            "edge": torch.rand((b, 1, h, w), generator=g),
            "sal": torch.rand((b, h, w), generator=g),
        },
        "meta": {"id": IDS, "size": [torch.tensor([s[0] for s in SIZES]), torch.tensor([s[1] for s in SIZES])]},
    }


def run_predict(out_dir: Path, batch: dict[str, Any], **options: Any) -> PredictionWriter:
    writer = PredictionWriter(str(out_dir), **options)
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[writer],
    )
    trainer.predict(FixedPredictions(TASKS), dataloaders=DataLoader([batch], batch_size=None))
    return writer


def crop(value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The window Pad centred the sample in, computed here by hand."""
    top, left = (PADDED[0] - size[0]) // 2, (PADDED[1] - size[1]) // 2
    return value[..., top : top + size[0], left : left + size[1]]


def expected_input(image: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()


def test_every_sample_gets_a_picture_of_its_input_and_each_colourised_prediction(tmp_path: Path) -> None:
    batch = make_batch()
    run_predict(tmp_path / "PRED", batch)
    for i, (sample_id, size) in enumerate(zip(IDS, SIZES)):
        path = tmp_path / "PRED" / "pictures" / f"{sample_id}.png"  # ids with '/' make sub-folders
        picture = np.asarray(Image.open(path))
        assert picture.dtype == np.uint8 and picture.shape[2] == 3
        layout = grid_layout([size] * 6, TITLES)
        assert (layout.rows, layout.columns) == (2, 3)  # 6 panels: 3 + 3
        assert picture.shape[:2] == (layout.height, layout.width)
        h, w = size
        panels = [picture[top : top + h, left : left + w] for top, left in layout.boxes]
        np.testing.assert_array_equal(panels[0], expected_input(crop(batch["image"][i], size)))
        for task, panel in zip(TASKS, panels[1:]):
            np.testing.assert_array_equal(panel, task.colorize(crop(batch["pred"][task.name][i], size)), err_msg=task.name)
        # the semseg panel shows the palette of the labels, not some other picture
        labels = crop(batch["pred"]["semseg"][i], size).numpy()
        assert len({tuple(panels[1][labels == k][0]) for k in np.unique(labels)}) == len(np.unique(labels))
    # the raw files are still written, cropped the same way
    raw = read_prediction(tmp_path / "PRED", TASKS[0], IDS[0], SIZES[0])
    torch.testing.assert_close(raw, crop(batch["pred"]["semseg"][0], SIZES[0]), rtol=0, atol=0)
    files = sorted(p.relative_to(tmp_path / "PRED").as_posix() for p in (tmp_path / "PRED").rglob("*") if p.is_file())
    assert len(files) == len(IDS) * (len(TASKS) + 1)  # no temporary file left


def test_raw_false_writes_only_pictures_and_pictures_false_only_raw_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batch = make_batch()
    with caplog.at_level(logging.INFO):
        run_predict(tmp_path / "pictures_only", batch, raw=False)
    assert sorted(p.name for p in (tmp_path / "pictures_only").iterdir()) == ["pictures"]
    assert len([p for p in (tmp_path / "pictures_only").rglob("*.png")]) == len(IDS)
    assert f"3 sample(s) written to {tmp_path / 'pictures_only' / 'pictures'}" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_predict(tmp_path / "raw_only", batch, pictures=False)
    assert sorted(p.name for p in (tmp_path / "raw_only").iterdir()) == sorted(t.name for t in TASKS)
    assert "pictures" not in caplog.text

    with pytest.raises(ValueError, match="raw and pictures are both false"):
        PredictionWriter(str(tmp_path / "none"), raw=False, pictures=False)


def test_the_end_message_says_where_the_pictures_are(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        run_predict(tmp_path / "PRED", make_batch(), tasks=["semseg", "depth"])
    pred = tmp_path / "PRED"
    assert f"written to {pred}; pictures (input and predictions side by side) in {pred / 'pictures'}" in caplog.text
    picture = np.asarray(Image.open(pred / "pictures" / "c.png"))  # only the tasks asked for, in one row
    layout = grid_layout([SIZES[2]] * 3, ["input", "semseg", "depth"])
    assert (layout.rows, picture.shape[:2]) == (1, (layout.height, layout.width))


def test_pictures_need_the_batch_images(tmp_path: Path) -> None:
    writer = PredictionWriter(str(tmp_path))
    writer.tasks = TASKS
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    batch = make_batch()
    with pytest.raises(ValueError, match=r"batch\['image'\]"):
        writer.write_batch(trainer, {**batch["pred"], "meta": batch["meta"]})


def test_grid_layout_rows_titles_and_background() -> None:
    image = torch.rand(3, 10, 30)
    panels = {f"p{k}": np.full((6, 8, 3), 10 * k, dtype=np.uint8) for k in range(4)}  # 5 cells: 3 + 2
    picture = prediction_grid(image, panels)
    layout = grid_layout([(10, 30)] + [(6, 8)] * 4, ["input", "p0", "p1", "p2", "p3"])
    assert (layout.rows, layout.columns, layout.cell_height, layout.cell_width) == (2, 3, 10, 30)
    step_y, step_x = layout.title_height + 10 + GRID_GAP, 30 + GRID_GAP
    assert picture.shape == (2 * (layout.title_height + 10) + GRID_GAP, 3 * 30 + 2 * GRID_GAP, 3)
    assert layout.boxes == (
        (layout.title_height, 0),
        (layout.title_height, step_x + 11), (layout.title_height, 2 * step_x + 11),  # 8 wide, centred in 30
        (step_y + layout.title_height, 11), (step_y + layout.title_height, step_x + 11),
    )
    np.testing.assert_array_equal(picture[layout.title_height : layout.title_height + 10, :30],
                                  (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    for k, (top, left) in enumerate(layout.boxes[1:]):
        assert (picture[top : top + 6, left : left + 8] == 10 * k).all()
    # everything else is white except the black titles, drawn inside the title bands only
    painted = np.zeros(picture.shape[:2], dtype=bool)
    for (top, left), (h, w) in zip(layout.boxes, [(10, 30)] + [(6, 8)] * 4):
        painted[top : top + h, left : left + w] = True
    titles = np.zeros_like(painted)
    for row in range(layout.rows):
        titles[row * step_y : row * step_y + layout.title_height, :] = True
    rest = picture[~painted & ~titles]
    assert (rest == 255).all()
    for cell in range(5):
        row, column = divmod(cell, 3)
        band = picture[row * step_y : row * step_y + layout.title_height, column * step_x : column * step_x + 30]
        assert band.min() < 100  # every title is written


def test_grid_layout_columns_and_wide_titles() -> None:
    layout = grid_layout([(4, 4)] * 3, ["a_very_long_task_name", "b", "c"], columns=1)
    assert (layout.rows, layout.columns) == (3, 1)
    assert layout.cell_width > 4  # widened to hold the title
    assert all(left == (layout.cell_width - 4) // 2 for _, left in layout.boxes)
    with pytest.raises(ValueError, match="panel"):
        prediction_grid(torch.rand(3, 4, 4), {"bad": np.zeros((4, 4), dtype=np.uint8)})


def test_predict_dir_pictures_show_each_photo_at_its_own_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Photos resized to predict_size are resized back, the input panel included, like the raw files."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    photos = {}
    for name, (h, w) in (("wide.png", (20, 30)), ("tall.png", (50, 40))):
        y, x = np.mgrid[0:h, 0:w]
        photos[name] = np.stack([255 * x / (w - 1), 255 * y / (h - 1), np.full((h, w), 128.0)], -1).round().astype(np.uint8)
        Image.fromarray(photos[name]).save(folder / name)
    datamodule = SynthScenesDataModule(
        tasks=["semseg", "normals"], num_train=2, num_val=2, image_size=(32, 48), cache_dir=str(tmp_path / "cache"),
        eval_batch_size=2, predict_dir=str(folder), predict_size=(32, 48),
    )
    net = tiny_hard_sharing(16, 8)
    model = MultiTaskModule(net, datamodule.tasks)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[PredictionWriter(str(tmp_path / "PRED"))])
    trainer.predict(model, datamodule=datamodule)
    semseg = next(t for t in datamodule.tasks if t.name == "semseg")
    for name, photo in photos.items():
        shape = photo.shape[:2]
        picture = np.asarray(Image.open(tmp_path / "PRED" / "pictures" / f"{name}.png"))
        layout = grid_layout([shape] * 3, ["input", "semseg", "normals"])
        assert picture.shape[:2] == (layout.height, layout.width)
        (top, left), (stop, sleft) = layout.boxes[:2]
        shown = picture[top : top + shape[0], left : left + shape[1]].astype(int)
        assert np.abs(shown - photo).max() <= 4  # the smooth (linear) photo survives the resize there and back
        labels = read_prediction(tmp_path / "PRED", semseg, name, shape)
        np.testing.assert_array_equal(picture[stop : stop + shape[0], sleft : sleft + shape[1]], semseg.colorize(labels))


def test_a_task_named_pictures_is_refused_while_both_are_written(tmp_path: Path) -> None:
    tasks = [build_task("semseg", num_classes=5, name="pictures")]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="pictures folder"):
        PredictionWriter(str(tmp_path)).setup(trainer, FixedPredictions(tasks), "predict")
    PredictionWriter(str(tmp_path), pictures=False).setup(trainer, FixedPredictions(tasks), "predict")
