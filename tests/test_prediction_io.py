"""Prediction files: formats, round trips through quantize_prediction, and readers' errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polytask.data.transforms import Pad, transform_kinds
from polytask.evaluation.prediction_io import (
    DEPTH_PNG_SCALE,
    PredictionFileError,
    encode_prediction,
    probe_prediction,
    quantize_prediction,
    read_prediction,
    write_prediction,
)
from polytask.tasks import build_task
from polytask.training.prediction_writer import centre_crop

SHAPE = (9, 13)
SEMSEG = build_task("semseg", num_classes=21)
PARTS = build_task("human_parts", num_classes=7)
SAL = build_task("sal")
EDGE = build_task("edge")
NORMALS = build_task("normals")
DEPTH = build_task("depth")


def _values(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "semseg": torch.randint(0, 21, SHAPE, generator=g),
        "human_parts": torch.randint(0, 7, SHAPE, generator=g),
        "sal": torch.rand(SHAPE, generator=g),
        "edge": torch.rand((1, *SHAPE), generator=g),
        "normals": torch.nn.functional.normalize(torch.randn((3, *SHAPE), generator=g), dim=0),
        "depth": 10 * torch.rand((1, *SHAPE), generator=g),
    }


@pytest.mark.parametrize("task", [SEMSEG, PARTS, SAL, EDGE, NORMALS, DEPTH], ids=lambda t: t.name)
@pytest.mark.parametrize("depth_format", ["npy", "png16"])
def test_round_trip_equals_in_memory_quantisation(tmp_path: Path, task, depth_format: str) -> None:
    value = _values()[task.name]
    path = write_prediction(tmp_path, task, "2008_000001", value, depth_format)
    suffix = ".npy" if task.name == "depth" and depth_format == "npy" else ".png"
    assert path == tmp_path / task.name / f"2008_000001{suffix}"
    assert probe_prediction(tmp_path, task, "2008_000001", SHAPE) == path
    read = read_prediction(tmp_path, task, "2008_000001", SHAPE)
    expected = quantize_prediction(task, value, depth_format)
    assert read.shape == value.shape and read.dtype == expected.dtype
    torch.testing.assert_close(read, expected, rtol=0, atol=0)
    # the batched form quantises the same way
    torch.testing.assert_close(quantize_prediction(task, value[None], depth_format)[0], expected, rtol=0, atol=0)


def test_files_hold_the_community_encodings(tmp_path: Path) -> None:
    prob = torch.tensor([[0.0, 0.5, 0.999, 1.0]])
    write_prediction(tmp_path, SAL, "a", prob)
    write_prediction(tmp_path, EDGE, "a", prob[None])
    for task in ("sal", "edge"):
        img = Image.open(tmp_path / task / "a.png")
        assert img.mode == "L"
        assert np.asarray(img).tolist() == [[0, 127, 254, 255]]  # uint8(255 p) truncates
    normals = torch.tensor([[[1.0]], [[0.0]], [[-1.0]]])
    write_prediction(tmp_path, NORMALS, "a", normals)
    img = Image.open(tmp_path / "normals" / "a.png")
    assert img.mode == "RGB" and np.asarray(img).tolist() == [[[255, 127, 0]]]
    write_prediction(tmp_path, SEMSEG, "a", torch.tensor([[0, 20]]))
    img = Image.open(tmp_path / "semseg" / "a.png")
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 20]]
    write_prediction(tmp_path, DEPTH, "a", torch.tensor([[[1.2344, 65.535]]]), "png16")
    img = Image.open(tmp_path / "depth" / "a.png")
    assert img.mode == "I;16" and np.asarray(img).tolist() == [[1234, 65535]]
    assert DEPTH_PNG_SCALE == 1000.0
    write_prediction(tmp_path / "npy", DEPTH, "a", torch.tensor([[[1.2344, 70.0]]]))
    stored = np.load(tmp_path / "npy" / "depth" / "a.npy")
    assert stored.dtype == np.float32 and stored.shape == (1, 2)


def test_palette_labels_and_16_bit_probabilities_are_read(tmp_path: Path) -> None:
    labels = np.array([[0, 3], [20, 1]], dtype=np.uint8)
    (tmp_path / "semseg").mkdir()
    Image.fromarray(labels).convert("P").save(tmp_path / "semseg" / "a.png")
    assert read_prediction(tmp_path, SEMSEG, "a", (2, 2)).tolist() == labels.tolist()
    (tmp_path / "edge").mkdir()
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(tmp_path / "edge" / "a.png")
    assert read_prediction(tmp_path, EDGE, "a", (1, 2)).tolist() == [[[0.0, 1.0]]]


def test_ids_with_folders_are_kept_and_unsafe_ids_refused(tmp_path: Path) -> None:
    value = _values()["semseg"]
    assert write_prediction(tmp_path, SEMSEG, "val/0001", value) == tmp_path / "semseg" / "val" / "0001.png"
    assert read_prediction(tmp_path, SEMSEG, "val/0001", SHAPE).equal(value)
    for bad in ("", "../escape", "/abs", "a//b", "./a"):
        with pytest.raises(ValueError, match="cannot name a prediction file"):
            write_prediction(tmp_path, SEMSEG, bad, value)


def test_writer_refuses_values_that_break_the_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="labels 0..21 outside 0..20"):
        encode_prediction(SEMSEG, torch.tensor([[0, 21]]))
    with pytest.raises(ValueError, match="expected integer labels"):
        encode_prediction(SEMSEG, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="1 non-finite"):
        encode_prediction(SAL, torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(ValueError, match=r"shape \(1, H, W\)"):
        encode_prediction(EDGE, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="negative depth"):
        encode_prediction(DEPTH, -torch.ones((1, *SHAPE)))
    with pytest.raises(ValueError, match="does not fit a 16-bit PNG"):
        encode_prediction(DEPTH, torch.full((1, 2, 2), 70.0), "png16")
    with pytest.raises(ValueError, match="no prediction file format"):
        encode_prediction(build_task("attributes", name="global", attribute_names=["a", "b"]), torch.zeros(2))
    assert not list(tmp_path.iterdir())


def _problem(tmp_path: Path, task, shape: tuple[int, int] = SHAPE) -> PredictionFileError:
    with pytest.raises(PredictionFileError) as info:
        read_prediction(tmp_path, task, "x", shape)
    return info.value


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_readers_name_the_file_and_what_was_expected(tmp_path: Path) -> None:
    err = _problem(tmp_path, SEMSEG)
    assert err.kind == "missing" and err.path == tmp_path / "semseg" / "x.png" and "task 'semseg'" in str(err)

    _save(tmp_path / "semseg" / "x.png", np.zeros((*SHAPE, 3), dtype=np.uint8))
    err = _problem(tmp_path, SEMSEG)
    assert err.kind == "mode" and "found a PNG image of mode RGB" in str(err) and str(tmp_path / "semseg" / "x.png") in str(err)

    _save(tmp_path / "normals" / "x.png", np.zeros(SHAPE, dtype=np.uint8))
    assert "expected an 8-bit RGB PNG" in str(_problem(tmp_path, NORMALS))

    _save(tmp_path / "sal" / "x.png", np.zeros((4, 5), dtype=np.uint8))
    err = _problem(tmp_path, SAL)
    assert err.kind == "shape" and "size 4x5 differs from the ground truth's 9x13" in str(err)

    (tmp_path / "edge").mkdir()
    (tmp_path / "edge" / "x.png").write_bytes(b"not a png")
    assert _problem(tmp_path, EDGE).kind == "unreadable"

    _save(tmp_path / "human_parts" / "x.png", np.full(SHAPE, 9, dtype=np.uint8))
    err = _problem(tmp_path, PARTS)
    assert err.kind == "values" and "class id(s) [9] outside 0..6" in str(err)


def test_depth_readers_check_format_and_values(tmp_path: Path) -> None:
    folder = tmp_path / "depth"
    folder.mkdir()
    np.save(folder / "x.npy", np.ones(SHAPE, dtype=np.int32))
    assert "expected float depths" in str(_problem(tmp_path, DEPTH))
    np.save(folder / "x.npy", np.ones((2, *SHAPE), dtype=np.float32))
    assert "expected a depth map (H, W)" in str(_problem(tmp_path, DEPTH))
    np.save(folder / "x.npy", np.full(SHAPE, np.nan, dtype=np.float32))
    assert "non-finite depth" in str(_problem(tmp_path, DEPTH))
    np.save(folder / "x.npy", -np.ones((*SHAPE, 1), dtype=np.float32))
    assert "negative depth" in str(_problem(tmp_path, DEPTH))
    _save(folder / "x.png", np.ones(SHAPE, dtype=np.uint16))
    err = _problem(tmp_path, DEPTH)
    assert err.kind == "ambiguous" and "x.npy and x.png" in str(err)
    (folder / "x.npy").unlink()
    _save(folder / "x.png", np.ones(SHAPE, dtype=np.uint8))
    assert "16-bit (I;16) PNG of millimetres" in str(_problem(tmp_path, DEPTH))


def test_centre_crop_undoes_the_evaluation_padding() -> None:
    g = torch.Generator().manual_seed(1)
    sample = {"image": torch.rand(3, 7, 10, generator=g), "semseg": torch.randint(0, 5, (7, 10), generator=g)}
    padded = Pad((12, 13), kinds=transform_kinds([SEMSEG]))(sample)
    assert padded["semseg"].shape == (12, 13)
    assert centre_crop(padded["semseg"], (7, 10)).equal(sample["semseg"])
    assert centre_crop(padded["image"], (7, 10)).equal(sample["image"])
    with pytest.raises(ValueError, match="was not padded"):
        centre_crop(sample["semseg"], (8, 10))


def test_resizing_back_keeps_labels_and_unit_normals() -> None:
    labels = torch.tensor([[0, 1], [2, 3]])
    assert SEMSEG.resize_prediction(labels, (4, 4)).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    normals = torch.nn.functional.normalize(torch.randn(3, 4, 5), dim=0)
    out = NORMALS.resize_prediction(normals, (7, 3))
    assert out.shape == (3, 7, 3)
    torch.testing.assert_close(out.norm(dim=0), torch.ones(7, 3))
    assert SAL.resize_prediction(torch.rand(4, 5), (2, 2)).shape == (2, 2)
    assert DEPTH.resize_prediction(torch.rand(1, 4, 5), (2, 3)).shape == (1, 2, 3)
