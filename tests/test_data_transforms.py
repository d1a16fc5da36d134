"""Joint transforms of the ATRC / InvPT protocol: consistency across targets, determinism, ignore padding."""

import pytest
import torch

from polytask.constants import IMAGENET_MEAN, IMAGENET_STD
from polytask.data.transforms import (
    IgnoreEmptyParts,
    Normalize,
    Pad,
    PhotometricDistortion,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    eval_transform,
    resize_nearest,
    train_transform,
    transform_kinds,
)
from polytask.tasks import build_task

TASKS = [
    build_task("semseg", num_classes=200),
    build_task("sal"),
    build_task("human_parts", num_classes=7),
    build_task("depth"),
    build_task("edge"),
    build_task("normals"),
]
KINDS = transform_kinds(TASKS)


def coordinate_sample(height: int = 20, width: int = 30) -> dict:
    """A sample whose every target encodes the pixel position, so misalignment is visible."""
    rows = torch.arange(height).view(-1, 1).expand(height, width)
    cols = torch.arange(width).view(1, -1).expand(height, width)
    code = rows * width + cols
    normals = torch.stack((torch.full((height, width), 0.6), torch.full((height, width), 0.0), torch.full((height, width), 0.8)))
    return {
        "image": torch.stack((rows.float(), cols.float(), torch.zeros(height, width))),
        "semseg": code % 200,
        "sal": (cols >= width // 2).long(),
        "human_parts": (rows % 7),
        "depth": (code.float() / 10.0 + 0.5)[None],
        "edge": (cols % 2).float()[None],
        "normals": normals,
        "meta": {"id": "x", "size": (height, width)},
    }


def test_nearest_resize_uses_the_opencv_index_rule() -> None:
    x = torch.arange(70).view(1, 70)
    # OpenCV picks floor(39 * (1 / (91 / 70))) = 29 at column 39, where floor(39 * 70 / 91) would give 30.
    assert int(resize_nearest(x, (1, 91))[0, 39]) == 29


def test_scale_resizes_every_target_and_divides_depth() -> None:
    sample = coordinate_sample()
    out = RandomScale((2.0, 2.0), kinds=KINDS)(sample)
    assert out["image"].shape == (3, 40, 60)
    for key in ("semseg", "sal", "human_parts"):
        assert out[key].shape == (40, 60) and out[key].dtype == torch.int64
        torch.testing.assert_close(out[key][::2, ::2], sample[key])
    torch.testing.assert_close(out["depth"][:, ::2, ::2], sample["depth"] / 2.0)
    assert out["normals"].shape == (3, 40, 60) and out["edge"].shape == (1, 40, 60)
    assert out["meta"] is sample["meta"]
    half = RandomScale((0.5, 0.5), kinds=KINDS)(sample)
    assert half["image"].shape == (3, 10, 15)
    torch.testing.assert_close(half["depth"], sample["depth"][:, ::2, ::2] / 0.5)


def test_crop_cuts_the_same_window_everywhere() -> None:
    sample = coordinate_sample()
    out = RandomCrop((8, 12), cat_max_ratio=1.0, generator=torch.Generator().manual_seed(3), kinds=KINDS)(sample)
    top, left = int(out["image"][0, 0, 0]), int(out["image"][1, 0, 0])
    window = (slice(top, top + 8), slice(left, left + 12))
    for key in ("semseg", "sal", "human_parts"):
        torch.testing.assert_close(out[key], sample[key][window])
    for key in ("depth", "edge", "normals"):
        torch.testing.assert_close(out[key], sample[key][(slice(None), *window)])


def test_crop_is_redrawn_until_no_class_covers_75_percent() -> None:
    semseg = torch.zeros(10, 40, dtype=torch.long)
    semseg[:, 20:] = torch.arange(20).repeat(10, 1)  # only the right half is varied
    sample = {"image": torch.zeros(3, 10, 40), "semseg": semseg}

    def largest_share(crop: RandomCrop) -> list[float]:
        shares = []
        for _ in range(10):
            _, counts = crop(sample)["semseg"].unique(return_counts=True)
            shares.append(float(counts.max() / counts.sum()))
        return shares

    def crop(ratio: float, ratio_key: str | None = "semseg") -> RandomCrop:
        return RandomCrop((10, 10), ratio, ratio_key=ratio_key, generator=torch.Generator().manual_seed(0), kinds=KINDS)

    assert max(largest_share(crop(0.75))) < 0.75
    assert max(largest_share(crop(1.0))) == 1.0
    assert max(largest_share(crop(0.75, ratio_key=None))) == 1.0
    smaller = RandomCrop((16, 16), generator=torch.Generator(), kinds=KINDS)({"image": torch.zeros(3, 10, 40), "semseg": semseg})
    assert smaller["image"].shape == (3, 10, 16)  # a short side is kept whole; padding comes later


def test_flip_negates_normals_x_and_keeps_ignore() -> None:
    sample = coordinate_sample()
    sample["normals"][:, 0, 0] = 255.0
    out = RandomHorizontalFlip(p=1.0, kinds=KINDS)(sample)
    torch.testing.assert_close(out["semseg"], sample["semseg"].flip(-1))
    torch.testing.assert_close(out["depth"], sample["depth"].flip(-1))
    assert torch.all(out["normals"][0, :, :-1] == -0.6) and torch.all(out["normals"][1:, :, :-1] == sample["normals"][1:, :, 1:])
    assert torch.all(out["normals"][:, 0, -1] == 255.0)
    assert RandomHorizontalFlip(p=0.0, kinds=KINDS)(sample) is sample


def test_flip_follows_custom_task_names() -> None:
    tasks = [build_task("normals", name="surface_normals"), build_task("semseg", name="material", num_classes=3)]
    kinds = transform_kinds(tasks)
    assert kinds == {"surface_normals": "direction", "material": "label"}
    sample = {"image": torch.zeros(3, 2, 2), "surface_normals": torch.ones(3, 2, 2), "material": torch.tensor([[0, 1], [2, 0]])}
    out = RandomHorizontalFlip(p=1.0, kinds=kinds)(sample)
    assert torch.all(out["surface_normals"][0] == -1) and out["material"].tolist() == [[1, 0], [0, 2]]


def test_photometric_distortion_changes_only_the_image() -> None:
    sample = coordinate_sample()
    sample["image"] = torch.randint(0, 256, (3, 20, 30), generator=torch.Generator().manual_seed(0)).float()
    changed = False
    for seed in range(8):
        out = PhotometricDistortion(generator=torch.Generator().manual_seed(seed))(sample)
        assert out["image"].dtype == torch.float32 and out["image"].min() >= 0 and out["image"].max() <= 255
        assert torch.equal(out["image"], out["image"].round())
        changed |= not torch.equal(out["image"], sample["image"])
        assert out["semseg"] is sample["semseg"] and out["normals"] is sample["normals"]
    assert changed


def test_normalize_and_pad_with_ignore() -> None:
    sample = coordinate_sample(6, 8)
    sample["image"] = torch.full((3, 6, 8), 255.0)
    out = Pad((10, 9), kinds=KINDS)(Normalize()(sample))
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out["image"][:, 2, 0], expected)
    assert out["image"].shape == (3, 10, 9) and (out["image"][:, :2] == 0).all() and (out["image"][:, :, 8] == 0).all()
    assert (out["semseg"][:2] == 255).all() and (out["semseg"][-2:] == 255).all() and (out["semseg"][:, -1] == 255).all()
    torch.testing.assert_close(out["semseg"][2:8, :8], sample["semseg"])
    assert (out["depth"][:, :2] == 255).all() and (out["normals"][:, :2] == 255).all() and (out["edge"][:, :2] == 255).all()


def test_images_without_parts_become_ignore() -> None:
    parts = torch.zeros(4, 4, dtype=torch.long)
    parts[0, 0] = 255
    assert (IgnoreEmptyParts(["human_parts"])({"human_parts": parts})["human_parts"] == 255).all()
    parts[1, 1] = 3
    assert IgnoreEmptyParts(["human_parts"])({"human_parts": parts})["human_parts"] is parts


def test_train_pipeline_is_deterministic_given_a_generator() -> None:
    sample = coordinate_sample()
    sample["image"] = torch.randint(0, 256, (3, 20, 30), generator=torch.Generator().manual_seed(1)).float()
    run = [train_transform((16, 16), TASKS, generator=torch.Generator().manual_seed(7))(dict(sample)) for _ in range(2)]
    for key in ("image", "semseg", "depth", "normals", "edge", "sal", "human_parts"):
        torch.testing.assert_close(run[0][key], run[1][key])
    assert run[0]["image"].shape == (3, 16, 16) and run[0]["semseg"].shape == (16, 16)
    other = train_transform((16, 16), TASKS, generator=torch.Generator().manual_seed(8))(dict(sample))
    assert not torch.equal(other["image"], run[0]["image"])


def test_eval_pipeline_only_normalises_and_pads() -> None:
    sample = coordinate_sample(6, 8)
    out = eval_transform((8, 8), TASKS)(sample)
    assert out["image"].shape == (3, 8, 8)
    torch.testing.assert_close(out["semseg"][1:7], sample["semseg"])
    assert eval_transform(None, TASKS)(sample)["image"].shape == (3, 6, 8)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_synthscenes_style_flip_call(p: float) -> None:
    flip = RandomHorizontalFlip(p, torch.Generator().manual_seed(0), kinds=KINDS)
    sample = {"image": torch.randn(3, 4, 5), "semseg": torch.arange(20).view(4, 5)}
    out = flip(sample)
    assert torch.equal(out["semseg"], sample["semseg"].flip(-1) if p else sample["semseg"])
