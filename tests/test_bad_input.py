"""Bad input: images to predict on (converted or refused by name), bad configs (refused before any
work), and NaN/inf losses (steps skipped, the run stopped with the tasks named)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import Dataset

from conftest import tiny_hard_sharing
from polytask.cli import main
from polytask.constants import IMAGENET_MEAN, IMAGENET_STD
from polytask.data.datamodule import MultiTaskDataModule
from polytask.data.predict import ImageFolder
from polytask.tasks import Task, build_task
from polytask.training.checkpoint import AtomicCheckpointIO, ResumableCheckpoint, read_checkpoint
from polytask.training.guard import NonFiniteGuard, NonFiniteTrainingError
from polytask.training.module import MultiTaskModule

SIZE = (32, 48)


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(path: Path, array: np.ndarray, header_size: tuple[int, int] | None = None) -> None:
    """Write a 16-bit grey ``(H, W)`` or RGB ``(H, W, 3)`` PNG (PIL writes no 16-bit RGB);
    ``header_size`` ``(W, H)`` makes the header claim another size (a decompression bomb)."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", *(header_size or (width, height)), 16, 2 if array.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


REFUSED = {
    "empty.png": "empty file (0 bytes)",
    "notes.txt": "not an image PIL can read",
    "random.jpg": "not an image PIL can read",
    "truncated.png": "corrupt or truncated image data",
    "truncated.jpg": "corrupt or truncated image",
    "float.tif": "floating-point image (mode F) is not supported",
    "bomb.png": "too many pixels (decompression bomb check)",
    "huge.png": "exceeds max_pixels=100000000",
}
CONVERTED = {
    "grey.png": "grey-scale image converted to RGB",
    "rgba.png": "alpha channel of RGBA image dropped",
    "palette.png": "alpha channel of RGBA image dropped",
    "grey16.png": "16-bit grey-scale (I;16) reduced to 8 bits",
    "grey16.tif": "16-bit grey-scale (I;16) reduced to 8 bits",
    "cmyk.jpg": "CMYK image converted to RGB",
    "wide.png": "downscaled from 3000 x 40 to 2048 x 27",
    "rotated.jpg": "rotated according to its EXIF orientation (6)",
    "anim.gif": "first of 2 frames used; P image converted to RGB",
}
GOOD = sorted([*CONVERTED, "rgb.png", "rgb16.png", "photo.jpg"])


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding every kind of good, convertible and bad file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "rgb.png")
    Image.fromarray(rgb).save(root / "photo.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(root / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full(SIZE, 128, np.uint8)])).save(root / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.png", transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.zeros((40, 3000, 3), np.uint8)).save(root / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(root / "rotated.jpg", exif=exif)
    frames = [Image.fromarray(rgb).convert("P"), Image.fromarray(255 - rgb).convert("P")]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    grey16 = rng.integers(0, 65536, SIZE, dtype=np.uint16)
    png(root / "grey16.png", grey16)
    tifffile.imwrite(root / "grey16.tif", grey16)
    png(root / "rgb16.png", rgb.astype(np.uint16) * 257)
    tifffile.imwrite(root / "float.tif", rng.random(SIZE, dtype=np.float32))
    (root / "empty.png").touch()
    (root / "notes.txt").write_text("not an image\n")
    (root / "random.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "truncated.png").write_bytes((root / "rgb.png").read_bytes()[:200])
    (root / "truncated.jpg").write_bytes((root / "photo.jpg").read_bytes()[:400])
    png(root / "bomb.png", grey16, header_size=(20000, 20000))
    png(root / "huge.png", grey16, header_size=(12000, 9000))
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "subfolder").mkdir()
    return root


def test_each_bad_image_is_converted_or_refused_by_name(image_dir: Path) -> None:
    folder = ImageFolder(image_dir)
    refused = {note.path.name: note.message for note in folder.refused}
    assert refused.keys() == REFUSED.keys()
    for name, reason in REFUSED.items():
        assert reason in refused[name], name
    converted: dict[str, str] = {}
    for note in folder.converted:
        converted[note.path.name] = "; ".join(filter(None, [converted.get(note.path.name), note.message]))
    assert converted.keys() == CONVERTED.keys()
    for name, note in CONVERTED.items():
        assert note in converted[name], name
    assert [p.name for p in folder.files] == GOOD


def test_good_images_are_normalised_like_training_images(image_dir: Path) -> None:
    folder = ImageFolder(image_dir, size=SIZE)
    rgb = np.asarray(Image.open(image_dir / "rgb.png"), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(rgb).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    samples = {folder[i]["meta"]["id"]: folder[i] for i in range(len(folder))}
    torch.testing.assert_close(samples["rgb.png"]["image"], expected)
    torch.testing.assert_close(samples["rgb16.png"]["image"], expected, atol=1e-6, rtol=0)
    grey = samples["grey16.png"]["image"]
    unnormalised = grey * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert grey.shape == (3, *SIZE) and torch.allclose(unnormalised[0], unnormalised[1], atol=1e-6)
    assert samples["wide.png"]["meta"]["size"] == (27, 2048) and samples["wide.png"]["image"].shape == (3, *SIZE)
    assert samples["rotated.jpg"]["meta"]["size"] == SIZE[::-1]


def test_a_folder_without_usable_images_is_refused_with_the_reasons(tmp_path: Path) -> None:
    (tmp_path / "empty.png").touch()
    with pytest.raises(ValueError, match=r"no usable image in .* \(1 file\(s\) refused\)\n  empty\.png: empty file"):
        ImageFolder(tmp_path)


class _Scenes(Dataset):
    """Random images with depth and saliency targets; the depth of ``poisoned`` indices is infinite somewhere."""

    def __init__(self, size: int, poisoned: set[int]) -> None:
        self.size = size
        self.poisoned = poisoned

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        g = torch.Generator().manual_seed(index)
        depth = 1.0 + 4.0 * torch.rand(1, *SIZE, generator=g)
        if index in self.poisoned:
            depth[0, 0, 0] = float("inf")
        return {
            "image": torch.randn(3, *SIZE, generator=g),
            "depth": depth,
            "sal": (torch.rand(SIZE, generator=g) > 0.5).long(),
            "meta": {"id": str(index), "size": SIZE},
        }


class _ScenesDataModule(MultiTaskDataModule):
    """A datamodule of :class:`_Scenes` that forwards ``predict_dir`` like real datamodules should."""

    name = "scenes"

    def __init__(self, poisoned: Sequence[int] = (), predict_dir: str | None = None, predict_size: tuple[int, int] | None = None) -> None:
        self.poisoned = set(poisoned)
        super().__init__(["depth", "sal"], 4, None, 0, predict_dir, predict_size)

    def available_tasks(self) -> list[Task]:
        return [build_task("depth"), build_task("sal")]

    def default_loss_weights(self) -> Mapping[str, float]:
        return {"depth": 1.0, "sal": 1.0}

    def make_dataset(self, split: str) -> Dataset:
        return _Scenes(8, self.poisoned if split == "train" else set())


def tiny_module(max_nonfinite_steps: int = 10) -> MultiTaskModule:
    net = tiny_hard_sharing()
    return MultiTaskModule(net=net, tasks=[build_task("depth"), build_task("sal")], max_nonfinite_steps=max_nonfinite_steps)


def trainer(root: Path, **options: object) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        **options,
    )


def test_predict_on_a_folder_processes_the_good_images_and_summarises(image_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    data = _ScenesDataModule(predict_dir=str(image_dir), predict_size=SIZE)
    with pytest.warns(UserWarning, match=rf"{len(REFUSED)} file\(s\) of .* refused, predicting the other {len(GOOD)}"):
        batches = trainer(tmp_path, enable_checkpointing=False).predict(tiny_module(), datamodule=data)
    ids = [i for batch in batches for i in batch["meta"]["id"]]
    assert ids == GOOD
    assert all(batch["depth"].shape[-2:] == SIZE for batch in batches)
    summary = capfd.readouterr().err
    assert f"predicted {len(GOOD)} image(s) of {image_dir}; {len(REFUSED)} refused" in summary
    for name in REFUSED:
        assert f"refused {name}: " in summary


def test_predict_dir_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"_ScenesDataModule: predict_dir .*missing is not an existing folder"):
        _ScenesDataModule(predict_dir=str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.max_stepz", "3"], "max_stepz"),
        (["--data.init_args.num_trian", "3"], "num_trian"),
    ],
)
@pytest.mark.usefixtures("fresh_cache")
def test_unknown_config_keys_stop_the_cli(args: list[str], message: str, workdir: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["fit", *args])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err
    assert list(workdir.iterdir()) == []


def test_unknown_keys_in_a_config_file_stop_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("trainer:\n  max_epoch: 3\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "run.yaml"])
    assert "max_epoch" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ("[semseg, semsegg]", r"unknown task\(s\) \['semsegg'\] in data.tasks \('semsegg': did you mean 'semseg'\?\)"),
        ("[attributes]", r"'attributes': a polytask task this dataset does not carry\); the dataset carries \['semseg'"),
        ("[depth, foo]", r"'foo': not a task polytask knows"),
    ],
)
@pytest.mark.usefixtures("fresh_cache")  # inside workdir: the check below sees a rendered split
def test_unknown_tasks_stop_the_cli_before_any_work(tasks: str, message: str, workdir: Path) -> None:
    with pytest.raises(ValueError, match=message):
        main(["fit", "--data.tasks", tasks])
    assert list(workdir.iterdir()) == [], "nothing was rendered, logged or checkpointed"


def test_repeated_nonfinite_losses_stop_training_naming_the_task_and_keep_the_last_good_checkpoint(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = tiny_module(max_nonfinite_steps=3)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    checkpoints = ResumableCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    run = trainer(tmp_path, max_steps=20, callbacks=[checkpoints])
    with (
        pytest.raises(
            NonFiniteTrainingError,
            match=r"3 consecutive optimizer steps were skipped \(max_nonfinite_steps=3\) "
            r"because the loss of task\(s\) depth \(3 of 3 steps\)",
        ),
        pytest.warns(UserWarning, match=r"non-finite loss of task\(s\) \['depth'\]; optimizer step skipped"),
    ):
        run.fit(module, datamodule=_ScenesDataModule(poisoned=range(8)))
    for key, value in module.state_dict().items():
        assert torch.equal(value, initial[key]), f"{key} changed during skipped steps"
    last = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 2 and last["polytask"]["guard"] == {"consecutive": 2, "total": 2}
    for key, value in last["state_dict"].items():
        assert torch.equal(value, initial[key]), key


def test_isolated_nonfinite_losses_are_skipped_counted_and_logged(tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = tiny_module(max_nonfinite_steps=3)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    run = trainer(tmp_path, max_epochs=3, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        run.fit(module, datamodule=_ScenesDataModule(poisoned=[0]))
    assert run.global_step == 6 and module.guard.total == 3
    assert float(run.callback_metrics["train/nonfinite_steps"]) == 3.0
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())
    assert any(not torch.equal(v, initial[k]) for k, v in module.state_dict().items()), "the good steps trained"


def test_guard_skips_infinite_gradients_and_restores_buffers() -> None:
    layer = torch.nn.BatchNorm1d(2)
    guard = NonFiniteGuard(max_consecutive=2)
    guard.snapshot(layer)
    layer(torch.randn(4, 2)).sum().backward()
    layer.weight.grad[0] = float("inf")
    assert guard.check(layer, step=5) == "non-finite gradients"
    assert layer.weight.grad is None and torch.equal(layer.running_mean, torch.zeros(2))
    layer(torch.randn(4, 2)).sum().backward()
    layer.weight.grad[0] = float("inf")
    assert guard.check(layer, step=6, check_gradients=False) is None, "an AMP grad scaler handles overflowing gradients"
    assert guard.consecutive == 0 and guard.total == 1
