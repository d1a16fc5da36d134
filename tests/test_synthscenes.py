"""Tests of the SynthScenes renderer and dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from polytask.data.datasets import synthscenes
from polytask.data.datasets.synthscenes import (
    CLASS_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PART_NAMES,
    TASKS,
    SynthScenes,
    boundary_map,
    render_scene,
    scene_seed,
)

H, W = 96, 128
SEEDS = range(12)
FLOOR, CEILING = CLASS_NAMES.index("floor"), CLASS_NAMES.index("ceiling")
SPHERE, BOX = CLASS_NAMES.index("sphere"), CLASS_NAMES.index("box")
TOP, FRONT = PART_NAMES.index("top"), PART_NAMES.index("front")


@pytest.fixture(scope="module")
def scenes() -> list[dict[str, np.ndarray]]:
    return [render_scene(seed, H, W) for seed in SEEDS]


def points(scene: dict[str, np.ndarray]) -> np.ndarray:
    """Back-projected pixel centres ``(3, H, W)`` in the normals' frame (x right, y down, z towards the camera)."""
    k = scene["intrinsics"].astype(np.float64)
    z = scene["depth"].astype(np.float64)
    ii, jj = np.meshgrid(np.arange(z.shape[0]), np.arange(z.shape[1]), indexing="ij")
    return np.stack(((jj - k[0, 2]) / k[0, 0] * z, (ii - k[1, 2]) / k[1, 1] * z, -z))


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles between unit vectors ``(3, ...)``."""
    return np.degrees(np.arccos(np.clip((a * b).sum(axis=0), -1.0, 1.0)))


def test_render_is_deterministic_per_seed() -> None:
    first, again, other = render_scene(5, H, W), render_scene(5, H, W), render_scene(6, H, W)
    assert first.keys() == again.keys()
    for key in first:
        assert first[key].dtype == again[key].dtype
        assert np.array_equal(first[key], again[key]), key
    assert not np.array_equal(first["image"], other["image"])
    assert not np.array_equal(first["depth"], other["depth"])


def test_render_arrays(scenes: list[dict[str, np.ndarray]]) -> None:
    for scene in scenes:
        assert scene["image"].dtype == np.uint8 and scene["image"].shape == (H, W, 3)
        assert scene["semseg"].dtype == np.int64 and scene["semseg"].shape == (H, W)
        assert scene["depth"].dtype == np.float32 and scene["depth"].shape == (H, W)
        assert scene["normals"].dtype == np.float32 and scene["normals"].shape == (3, H, W)
        assert scene["instance"].dtype == np.int32 and scene["instance"].shape == (H, W)
        assert scene["human_parts"].dtype == np.int64 and scene["human_parts"].shape == (H, W)
        assert (scene["depth"] > 0).all()
        np.testing.assert_allclose(np.linalg.norm(scene["normals"], axis=0), 1.0, atol=1e-5)
        assert set(np.unique(scene["semseg"])) <= set(range(len(CLASS_NAMES)))
        for inst in np.unique(scene["instance"]):
            assert len(np.unique(scene["semseg"][scene["instance"] == inst])) == 1
    assert "human_parts" not in render_scene(0, H, W, parts=False)


def test_normals_face_the_camera(scenes: list[dict[str, np.ndarray]]) -> None:
    for scene in scenes:
        to_camera = -points(scene)
        assert ((scene["normals"] * to_camera).sum(axis=0) > 0).all()
        floor = scene["semseg"] == FLOOR
        assert (scene["normals"][1][floor] < 0).all()
        assert (scene["normals"][0][scene["instance"] == 2] > 0).all()
        assert (scene["normals"][0][scene["instance"] == 3] < 0).all()


def test_room_plane_normals_match_back_projected_depth(scenes: list[dict[str, np.ndarray]]) -> None:
    checked = 0
    for scene in scenes:
        p = points(scene)
        inst = scene["instance"]
        normals = scene["normals"].astype(np.float64)
        # cross product of the finite differences towards the right and lower neighbours
        du = p[:, 1:-1, 2:] - p[:, 1:-1, 1:-1]
        dv = p[:, 2:, 1:-1] - p[:, 1:-1, 1:-1]
        n_depth = np.cross(du, dv, axis=0)
        n_depth /= np.linalg.norm(n_depth, axis=0)
        for plane in range(6):
            mask = inst == plane
            interior = mask[1:-1, 1:-1] & mask[1:-1, 2:] & mask[2:, 1:-1] & mask[:-2, 1:-1] & mask[1:-1, :-2]
            if interior.sum() < 20:
                continue
            plane_normal = normals[:, mask][:, 0]
            assert np.abs(normals[:, mask] - plane_normal[:, None]).max() < 1e-6
            offsets = (plane_normal[:, None] * p[:, mask]).sum(axis=0)
            assert np.ptp(offsets) < 1e-3
            assert angle_deg(n_depth[:, interior], normals[:, 1:-1, 1:-1][:, interior]).max() < 2.0
            checked += 1
    assert checked >= 3 * len(scenes)


def test_sphere_normals_point_from_the_centre(scenes: list[dict[str, np.ndarray]]) -> None:
    checked = 0
    for scene in scenes:
        p, normals = points(scene), scene["normals"].astype(np.float64)
        for inst in np.unique(scene["instance"]):
            mask = scene["instance"] == inst
            if scene["semseg"][mask][0] != SPHERE or mask.sum() < 30:
                continue
            # least squares p = centre + radius * n over the sphere's pixels
            n = normals[:, mask].T
            a = np.concatenate((np.tile(np.eye(3), (len(n), 1)), n.reshape(-1, 1)), axis=1)
            solution, *_ = np.linalg.lstsq(a, p[:, mask].T.reshape(-1), rcond=None)
            centre, radius = solution[:3], solution[3]
            assert radius > 0.1
            offset = p[:, mask] - centre[:, None]
            np.testing.assert_allclose(np.linalg.norm(offset, axis=0), radius, atol=1e-3)
            assert angle_deg(offset / np.linalg.norm(offset, axis=0), n.T).max() < 0.5
            checked += 1
    assert checked >= 3


def test_box_top_normals_are_the_floor_normal(scenes: list[dict[str, np.ndarray]]) -> None:
    checked = 0
    for scene in scenes:
        floor, top = scene["semseg"] == FLOOR, scene["human_parts"] == TOP
        if top.sum() < 5:
            continue
        up = scene["normals"][:, floor][:, 0]
        assert np.abs(scene["normals"][:, top] - up[:, None]).max() < 1e-5
        checked += 1
    assert checked >= 2


def test_parts_label_box_faces_or_ignore_the_image(scenes: list[dict[str, np.ndarray]]) -> None:
    seen_box = seen_no_box = False
    for scene in scenes:
        parts, box = scene["human_parts"], scene["semseg"] == BOX
        if box.any():
            seen_box = True
            assert np.array_equal(parts > 0, box)
            assert set(np.unique(parts)) <= set(range(len(PART_NAMES)))
            assert (parts == FRONT).any()
        else:
            seen_no_box = True
            assert (parts == 255).all()
    assert seen_box and seen_no_box


def test_boundary_map_is_one_sided_and_covers_label_changes(scenes: list[dict[str, np.ndarray]]) -> None:
    for scene in scenes:
        inst, semseg = scene["instance"], scene["semseg"]
        edge = boundary_map(inst)
        assert edge.dtype == np.float32 and set(np.unique(edge)) <= {0.0, 1.0}
        right = np.zeros_like(edge, dtype=bool)
        down = np.zeros_like(edge, dtype=bool)
        right[:, :-1] = inst[:, :-1] != inst[:, 1:]
        down[:-1] = inst[:-1] != inst[1:]
        assert np.array_equal(edge == 1, right | down)
        assert (edge[:, :-1][semseg[:, :-1] != semseg[:, 1:]] == 1).all()
        assert (edge[:-1][semseg[:-1] != semseg[1:]] == 1).all()


def test_scene_seeds_differ_across_splits_and_seeds() -> None:
    seeds = {split: {scene_seed(0, split, i) for i in range(500)} for split in ("train", "val", "test")}
    assert all(len(s) == 500 for s in seeds.values())
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    assert scene_seed(0, "train", 0) != scene_seed(1, "train", 0)
    with pytest.raises(ValueError, match="available"):
        scene_seed(0, "training", 0)


def test_dataset_sample_contract(tmp_path: Path) -> None:
    ds = SynthScenes("val", num_samples=4, image_size=(24, 32), seed=1, cache_dir=tmp_path)
    assert len(ds) == 4
    sample = ds[3]
    assert set(sample) == {"image", "meta", *TASKS}
    expected = {
        "image": (torch.float32, (3, 24, 32)),
        "semseg": (torch.int64, (24, 32)),
        "human_parts": (torch.int64, (24, 32)),
        "sal": (torch.int64, (24, 32)),
        "normals": (torch.float32, (3, 24, 32)),
        "depth": (torch.float32, (1, 24, 32)),
        "edge": (torch.float32, (1, 24, 32)),
    }
    for key, (dtype, shape) in expected.items():
        assert sample[key].dtype == dtype and tuple(sample[key].shape) == shape, key
    assert sample["meta"] == {"id": "val_000003", "size": (24, 32)}
    raw = render_scene(scene_seed(1, "val", 3), 24, 32)
    rgb = sample["image"] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(rgb, torch.from_numpy(raw["image"]).permute(2, 0, 1).float() / 255, atol=1e-5, rtol=0)
    assert torch.equal(sample["sal"], (sample["semseg"] >= SPHERE).long())
    assert torch.equal(sample["edge"][0], torch.from_numpy(boundary_map(raw["instance"])))
    with pytest.raises(IndexError):
        ds[4]


def test_dataset_tasks_and_transform(tmp_path: Path) -> None:
    ds = SynthScenes(
        "train",
        num_samples=2,
        image_size=(16, 16),
        tasks=("depth", "sal"),
        cache_dir=tmp_path,
        transform=lambda sample: {**sample, "flag": True},
    )
    assert set(ds[0]) == {"image", "depth", "sal", "meta", "flag"}
    with pytest.raises(ValueError, match="available: semseg, depth, normals, edge, sal, human_parts"):
        SynthScenes(tasks=("semseg", "albedo"), cache_dir=tmp_path)


def test_splits_differ(tmp_path: Path) -> None:
    train = SynthScenes("train", num_samples=3, image_size=(16, 24), cache_dir=tmp_path)
    val = SynthScenes("val", num_samples=3, image_size=(16, 24), cache_dir=tmp_path)
    for i in range(3):
        assert not torch.equal(train[i]["image"], val[i]["image"])
    assert train.cache_path != val.cache_path


def test_cache_round_trip_equals_fresh_rendering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = SynthScenes("test", num_samples=5, image_size=(24, 32), seed=2, cache_dir=tmp_path)
    path = fresh.prepare()
    assert path.exists() and path.parent == tmp_path and _cache_files(tmp_path) == [path.name]
    assert isinstance(np.load(path, mmap_mode="r"), np.memmap)

    def no_rendering(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached split was rendered again")

    monkeypatch.setattr(synthscenes, "_render_record", no_rendering)
    cached = SynthScenes("test", num_samples=5, image_size=(24, 32), seed=2, cache_dir=tmp_path)
    for i in range(5):
        raw = render_scene(scene_seed(2, "test", i), 24, 32)
        sample = cached[i]
        assert np.array_equal(sample["semseg"].numpy(), raw["semseg"])
        assert np.array_equal(sample["human_parts"].numpy(), raw["human_parts"])
        assert np.array_equal(sample["depth"][0].numpy(), raw["depth"])
        assert np.array_equal(sample["normals"].numpy(), raw["normals"])
        for key, value in fresh[i].items():
            assert torch.equal(value, sample[key]) if key != "meta" else value == sample[key]


def test_cache_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    render_record = synthscenes._render_record
    calls = []

    def failing(seed: int, height: int, width: int, parts: bool) -> np.ndarray:
        calls.append(seed)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return render_record(seed, height, width, parts)

    monkeypatch.setattr(synthscenes, "_render_record", failing)
    ds = SynthScenes("train", num_samples=4, image_size=(16, 16), cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="interrupted"):
        ds[0]
    assert _cache_files(tmp_path) == []
    monkeypatch.setattr(synthscenes, "_render_record", render_record)
    assert ds.prepare().exists()
    assert len(_cache_files(tmp_path)) == 1


def _cache_files(folder: Path) -> list[str]:
    """Names in ``folder`` other than the lock files of :meth:`SynthScenes.prepare`."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_concurrent_prepare_renders_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # another process holds the split's lock while it "renders" (writes the file, then releases):
    # prepare() waits for it and then reads its file instead of rendering the split again
    ds = SynthScenes("val", num_samples=2, image_size=(16, 16), cache_dir=tmp_path)
    path = ds.cache_path
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, filelock, pathlib; path = pathlib.Path(sys.argv[1])\n"
        "with filelock.FileLock(str(path) + '.lock'):\n"
        "    print('locked', flush=True); time.sleep(1.5); path.write_bytes(b'rendered elsewhere')"
    ), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"

        def no_rendering(*args: object, **kwargs: object) -> None:
            raise AssertionError("the split was rendered twice")

        monkeypatch.setattr(synthscenes, "_write_split", no_rendering)
        assert ds.prepare() == path
        assert path.read_bytes() == b"rendered elsewhere"
    finally:
        holder.wait(timeout=30)
