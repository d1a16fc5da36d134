"""Writers of tiny dataset trees in the published layouts (PASCAL_MT, NYUD_MT x2, MTAN, CelebA, folder).

Each writer fills ``root`` deterministically and returns a :class:`Fixture` with the split ids and
the raw arrays it wrote, so tests can compute the expected decodings independently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import yaml
from PIL import Image


@dataclass
class Fixture:
    """What a writer put under ``root``: ids per split and raw arrays per sample id."""

    root: Path
    splits: dict[str, list[str]]
    raw: dict[str, dict[str, Any]] = field(default_factory=dict)


def _blocks(rng: np.random.Generator, shape: tuple[int, int], values: list[int], block: int = 4) -> np.ndarray:
    """Piecewise-constant map of ``values`` in ``block`` x ``block`` tiles (int64)."""
    h, w = shape
    tiles = rng.choice(values, size=(-(-h // block), -(-w // block)))
    return np.kron(tiles, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.int64)


def _rgb(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray, **kwargs: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _parts_struct(parts: list[tuple[str, np.ndarray]]) -> np.ndarray:
    if not parts:
        return np.zeros((0, 0))
    array = np.empty((1, len(parts)), dtype=[("part_name", object), ("mask", object)])
    for i, (name, mask) in enumerate(parts):
        array[0, i] = (name, mask.astype(np.uint8))
    return array


def write_pascal_part_mat(path: Path, image_id: str, objects: list[dict[str, Any]]) -> None:
    """A PASCAL-Part ``anno`` struct: objects ``{class, class_ind, mask, parts: [(name, mask)]}``."""
    dtype = [("class", object), ("class_ind", object), ("mask", object), ("parts", object)]
    array = np.empty((1, len(objects)), dtype=dtype)
    for i, obj in enumerate(objects):
        array[0, i] = (
            obj["class"],
            np.array([[obj["class_ind"]]], dtype=np.uint8),
            obj["mask"].astype(np.uint8),
            _parts_struct(obj["parts"]),
        )
    anno = np.empty((1, 1), dtype=[("imname", object), ("objects", object)])
    anno[0, 0] = (image_id, array)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"anno": anno})


def _rect(shape: tuple[int, int], top: int, bottom: int, left: int, right: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _pascal_objects(kind: str, shape: tuple[int, int]) -> list[dict[str, Any]]:
    """Annotated objects of the fixture's images (see :func:`write_pascal_context`)."""
    person = _rect(shape, 4, 30, 8, 24)
    dog = _rect(shape, 20, 36, 28, 44)
    dog_parts = [("head", _rect(shape, 20, 24, 28, 32))]
    person_parts = [
        ("hair", _rect(shape, 4, 6, 12, 20)),
        ("head", _rect(shape, 6, 10, 12, 20)),
        ("torso", _rect(shape, 10, 18, 10, 22)),
        ("luarm", _rect(shape, 10, 14, 8, 10)),
        ("llarm", _rect(shape, 14, 18, 8, 10)),
        ("rhand", _rect(shape, 18, 20, 22, 24)),
        ("luleg", _rect(shape, 18, 24, 10, 14)),
        ("rlleg", _rect(shape, 24, 28, 18, 22)),
        ("lfoot", _rect(shape, 28, 30, 10, 14)),
    ]
    if kind == "person_with_parts":
        return [
            {"class": "person", "class_ind": 15, "mask": person, "parts": person_parts},
            {"class": "dog", "class_ind": 12, "mask": dog, "parts": dog_parts},
        ]
    if kind == "no_person":
        return [{"class": "dog", "class_ind": 12, "mask": dog, "parts": dog_parts}]
    if kind == "person_without_parts":
        return [{"class": "person", "class_ind": 15, "mask": person, "parts": []}]
    if kind == "two_persons":
        second = _rect(shape, 2, 38, 30, 46)
        return [
            {"class": "person", "class_ind": 15, "mask": person, "parts": person_parts[:3]},
            {"class": "person", "class_ind": 15, "mask": second, "parts": []},
        ]
    if kind == "empty_person_mask":
        return [{"class": "person", "class_ind": 15, "mask": np.zeros(shape, bool), "parts": person_parts[:2]}]
    raise ValueError(kind)


PASCAL_PART_KINDS = {
    "2008_000001": "person_with_parts",
    "2008_000002": "no_person",
    "2008_000003": "person_without_parts",
    "2008_000004": "two_persons",
    "2008_000005": "empty_person_mask",
}
# Context classes used in LabelMaps: 284 person, 427 tvmonitor, 3 (valid for normals); 1, 2, 5 (not).
PASCAL_CONTEXT_CLASSES = [284, 427, 3, 1, 2, 5]


def write_pascal_context(root: Path, shape: tuple[int, int] = (40, 48), seed: int = 0) -> Fixture:
    """PASCAL_MT: 3 train and 2 val images; ``2008_000003``'s semseg is in ``semseg/pascal-context``."""
    rng = np.random.default_rng(seed)
    splits = {"train": ["2008_000001", "2008_000002", "2008_000003"], "val": ["2008_000004", "2008_000005"]}
    fixture = Fixture(root, splits)
    for split, ids in splits.items():
        _write_lines(root / "ImageSets" / "Context" / f"{split}.txt", ids)
    for image_id, kind in PASCAL_PART_KINDS.items():
        image = _rgb(rng, shape)
        _save(root / "JPEGImages" / f"{image_id}.jpg", image, quality=95)
        semseg = _blocks(rng, shape, list(range(21)), block=8)
        semseg[0, :] = 255
        folder = "pascal-context" if image_id == "2008_000003" else "VOC12"
        _save(root / "semseg" / folder / f"{image_id}.png", semseg.astype(np.uint8))
        label_map = _blocks(rng, shape, PASCAL_CONTEXT_CLASSES, block=6).astype(np.uint16)
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat", {"LabelMap": label_map})
        sal = rng.integers(0, 256, size=shape, dtype=np.uint8)
        _save(root / "sal_distill" / f"{image_id}.png", sal)
        normals = _rgb(rng, shape)
        _save(root / "normals_distill" / f"{image_id}.png", normals)
        objects = _pascal_objects(kind, shape)
        write_pascal_part_mat(root / "human_parts" / f"{image_id}.mat", image_id, objects)
        fixture.raw[image_id] = {
            "semseg": semseg, "label_map": label_map, "sal": sal, "normals": normals, "objects": objects, "kind": kind,
        }
    return fixture


def write_nyud(
    root: Path, version: str = "atrc", shape: tuple[int, int] = (36, 44), n_train: int = 3, n_val: int = 2, seed: int = 0
) -> Fixture:
    """NYUD_MT in the ``atrc`` (PNG) or ``mti-net`` (JPG + .npy) version."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:04d}" for i in range(n_train + n_val)]
    splits = {"train": ids[:n_train], "val": ids[n_train:]}
    fixture = Fixture(root, splits)
    for split, split_ids in splits.items():
        _write_lines(root / "gt_sets" / f"{split}.txt", split_ids)
    for image_id in ids:
        image = _rgb(rng, shape)
        segmentation = _blocks(rng, shape, list(range(41)), block=6)
        depth = rng.uniform(0.5, 8.0, size=shape).astype(np.float32)
        depth[:, :3] = 0.0
        raw: dict[str, Any] = {"segmentation": segmentation, "depth": depth}
        _save(root / "segmentation" / f"{image_id}.png", segmentation.astype(np.uint8))
        _save_npy(root / "depth" / f"{image_id}.npy", depth)
        if version == "atrc":
            _save(root / "images" / f"{image_id}.png", image)
            normals = _rgb(rng, shape)
            edge = (rng.random(shape) < 0.2).astype(np.uint8) * 255
            _save(root / "normals" / f"{image_id}.png", normals)
            _save(root / "edge" / f"{image_id}.png", edge)
        else:
            _save(root / "images" / f"{image_id}.jpg", image, quality=95)
            vectors = rng.normal(size=(*shape, 3)).astype(np.float32)
            normals = vectors / np.linalg.norm(vectors, axis=2, keepdims=True)
            normals[-2:, :] = 0.0
            edge = (rng.random(shape) < 0.2).astype(np.float32)
            _save_npy(root / "normals" / f"{image_id}.npy", normals)
            _save_npy(root / "edge" / f"{image_id}.npy", edge)
        raw.update(image=image, normals=normals, edge=edge)
        fixture.raw[image_id] = raw
    return fixture


def write_mtan_nyuv2(root: Path, shape: tuple[int, int] = (24, 32), n_train: int = 3, n_val: int = 2, seed: int = 0) -> Fixture:
    """MTAN NYUv2: ``{train,val}/{image,label,depth,normal}/<i>.npy``."""
    rng = np.random.default_rng(seed)
    fixture = Fixture(root, {"train": [str(i) for i in range(n_train)], "val": [str(i) for i in range(n_val)]})
    for split, ids in fixture.splits.items():
        for image_id in ids:
            image = rng.random((*shape, 3)).astype(np.float32)
            label = _blocks(rng, shape, list(range(-1, 13)), block=4).astype(np.float32)
            depth = rng.uniform(0.5, 9.0, size=(*shape, 1)).astype(np.float32)
            depth[:2] = 0.0
            vectors = rng.normal(size=(*shape, 3)).astype(np.float32)
            normal = vectors / np.linalg.norm(vectors, axis=2, keepdims=True)
            normal[-3:, :] = 0.0
            normal[0, 0] = (0.5, -0.5, 0.0)  # components summing to 0: masked out by MTAN
            for folder, array in (("image", image), ("label", label), ("depth", depth), ("normal", normal)):
                _save_npy(root / split / folder / f"{image_id}.npy", array)
            fixture.raw[f"{split}/{image_id}"] = {"image": image, "label": label, "depth": depth, "normal": normal}
    return fixture


def write_mtan_cityscapes(root: Path, shape: tuple[int, int] = (16, 32), n_train: int = 3, n_val: int = 2, seed: int = 0) -> Fixture:
    """MTAN Cityscapes: ``{train,val}/{image,label_7,label_19,depth}/<i>.npy``."""
    rng = np.random.default_rng(seed)
    fixture = Fixture(root, {"train": [str(i) for i in range(n_train)], "val": [str(i) for i in range(n_val)]})
    for split, ids in fixture.splits.items():
        for image_id in ids:
            image = rng.random((*shape, 3)).astype(np.float32)
            label_7 = _blocks(rng, shape, list(range(-1, 7)), block=4).astype(np.float32)
            label_19 = _blocks(rng, shape, list(range(-1, 19)), block=4).astype(np.float32)
            depth = rng.uniform(0.0, 0.3, size=(*shape, 1)).astype(np.float32)
            depth[:, :2] = 0.0
            for folder, array in (("image", image), ("label_7", label_7), ("label_19", label_19), ("depth", depth)):
                _save_npy(root / split / folder / f"{image_id}.npy", array)
            fixture.raw[f"{split}/{image_id}"] = {"image": image, "label_7": label_7, "label_19": label_19, "depth": depth}
    return fixture


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()


def write_celeba(root: Path, nested: bool = False, n: int = 9, seed: int = 0) -> Fixture:
    """CelebA with ``n`` 178x218 images split 0/1/2 in turn; ``nested`` uses ``Img/``, ``Anno/``, ``Eval/``."""
    rng = np.random.default_rng(seed)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    codes = [i % 3 for i in range(n)]
    values = rng.choice([-1, 1], size=(n, 40))
    images = root / ("Img/img_align_celeba" if nested else "img_align_celeba")
    attr_path = root / ("Anno/list_attr_celeba.txt" if nested else "list_attr_celeba.txt")
    part_path = root / ("Eval/list_eval_partition.txt" if nested else "list_eval_partition.txt")
    for name in names:
        _save(images / name, _rgb(rng, (218, 178)), quality=90)
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(names, values)]
    _write_lines(attr_path, [str(n), " ".join(CELEBA_ATTRIBUTES), *rows])
    _write_lines(part_path, [f"{name} {code}" for name, code in zip(names, codes)])
    split_names = ("train", "val", "test")
    fixture = Fixture(root, {s: [nm for nm, c in zip(names, codes) if c == k] for k, s in enumerate(split_names)})
    fixture.raw = {name: {"attributes": row} for name, row in zip(names, values)}
    return fixture


FOLDER_SPEC: dict[str, Any] = {
    "tasks": {
        "semseg": {"kind": "semseg", "classes": ["background", "road", "car"]},
        "surface": {"kind": "semseg", "classes": ["matte", "glossy"]},
        "depth": {"kind": "depth", "png_scale": 1000},
        "normals": {"kind": "normals"},
        "edge": {"kind": "edge"},
    },
    "loss_weights": {"normals": 10.0},
}


def write_folder(root: Path, shape: tuple[int, int] = (28, 36), n_train: int = 3, n_val: int = 2, seed: int = 0) -> Fixture:
    """A folder dataset with semseg (PNG), surface (.npy), depth (16-bit PNG in mm), normals (PNG), edge (.npy)."""
    rng = np.random.default_rng(seed)
    ids = [f"scene_{i}" for i in range(n_train + n_val)]
    fixture = Fixture(root, {"train": ids[:n_train], "val": ids[n_train:]})
    root.mkdir(parents=True, exist_ok=True)
    (root / "polytask.yaml").write_text(yaml.safe_dump(FOLDER_SPEC, sort_keys=False))
    for split, split_ids in fixture.splits.items():
        _write_lines(root / "splits" / f"{split}.txt", split_ids)
    for image_id in ids:
        image = _rgb(rng, shape)
        semseg = _blocks(rng, shape, [0, 1, 2, 255], block=4)
        surface = _blocks(rng, shape, [0, 1], block=4).astype(np.uint8)
        depth_mm = rng.integers(0, 10000, size=shape).astype(np.uint16)
        normals = _rgb(rng, shape)
        normals[:2] = 0
        edge = (rng.random(shape) < 0.2).astype(np.uint8)
        _save(root / "images" / f"{image_id}.png", image)
        _save(root / "semseg" / f"{image_id}.png", semseg.astype(np.uint8))
        _save_npy(root / "surface" / f"{image_id}.npy", surface)
        _save(root / "depth" / f"{image_id}.png", depth_mm)
        _save(root / "normals" / f"{image_id}.png", normals)
        _save_npy(root / "edge" / f"{image_id}.npy", edge)
        fixture.raw[image_id] = {
            "image": image, "semseg": semseg, "surface": surface, "depth_mm": depth_mm, "normals": normals, "edge": edge,
        }
    return fixture
