"""SynthScenes: a procedurally rendered multi-task dataset that needs no download.

Every scene is a closed box-shaped room (floor, ceiling, four walls) holding 2-6 objects
(spheres, y-rotated boxes, capped vertical cylinders) that stand on the floor or float.
A pinhole camera inside the room looks towards the back wall. Images are rendered by
vectorised NumPy ray casting: one primary ray through the centre of every pixel, solid
procedural textures (checker, stripes, value noise), Lambertian shading from one point
light plus ambient light, shadow rays against the objects, and mild Gaussian image noise.
All labels come from the geometry of the primary ray's first hit, without anti-aliasing.

Coordinate conventions:

* World: metres, ``y`` up, the floor is ``y = 0``, the front wall (behind the camera) is
  ``z = 0`` and the back wall ``z = depth``; the room spans ``x`` in ``[-width/2, width/2]``.
* Camera rays use the OpenCV frame (``x`` right, ``y`` down, ``z`` forward). Pixel
  ``(row i, column j)`` is cast through ``((j - cx) / f, (i - cy) / f, 1)`` with
  ``cx = (W - 1) / 2`` and ``cy = (H - 1) / 2``: the intrinsics ``K`` map camera points to
  pixel indices, a camera point ``z * K^-1 (j, i, 1)`` lies on the ray of pixel ``(i, j)``.
* ``depth`` is the metric distance along the camera's optical axis (z-depth).
* ``normals`` are unit surface normals in the camera frame of the sample contract: ``x``
  right, ``y`` down, ``z`` towards the camera, i.e. the OpenCV components with ``z`` negated.
  Every visible surface faces the camera, so its normal has a positive component along the
  direction from the surface to the camera (for a surface straight ahead, ``n_z > 0``).
  Mirroring the image left-right negates ``n_x`` and nothing else.

Instances: the six room planes are instances 0-5 (floor, ceiling, left, right, back and
front wall) and object ``k`` is instance ``6 + k``.
"""

from __future__ import annotations

import colorsys
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import Dataset

from polytask.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from polytask.data.datamodule import MultiTaskDataModule
from polytask.data.transforms import RandomHorizontalFlip, transform_kinds
from polytask.tasks import Task, build_task

CLASS_NAMES: tuple[str, ...] = ("floor", "wall", "ceiling", "sphere", "box", "cylinder")
PART_NAMES: tuple[str, ...] = ("background", "top", "front", "side")
TASKS: tuple[str, ...] = ("semseg", "depth", "normals", "edge", "sal", "human_parts")
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "semseg": 1.0,
    "depth": 1.0,
    "normals": 10.0,
    "edge": 50.0,
    "sal": 5.0,
    "human_parts": 2.0,
}

VERSION = 2
"""Renderer version; part of the cache key, bump it whenever rendered arrays change."""

SPLITS: tuple[str, ...] = ("train", "val", "test")

_FLOOR, _WALL, _CEILING, _SPHERE, _BOX, _CYLINDER = range(6)
_PART_TOP, _PART_FRONT, _PART_SIDE = 1, 2, 3
_NUM_PLANES = 6
_EPS = 1e-4
_LIGHT_FALLOFF = 6.0  # metres from the light at which its irradiance has halved
# Room planes in instance order: (axis, True for the upper bound, class, inward normal).
_PLANES = (
    (1, False, _FLOOR, (0.0, 1.0, 0.0)),
    (1, True, _CEILING, (0.0, -1.0, 0.0)),
    (0, False, _WALL, (1.0, 0.0, 0.0)),
    (0, True, _WALL, (-1.0, 0.0, 0.0)),
    (2, True, _WALL, (0.0, 0.0, -1.0)),
    (2, False, _WALL, (0.0, 0.0, 1.0)),
)
# Plane instance by ``2 * axis + upper`` of the room face a ray leaves through.
_PLANE_BY_EXIT = np.array(
    [
        next(i for i, plane in enumerate(_PLANES) if plane[:2] == (axis, upper))
        for axis in range(3)
        for upper in (False, True)
    ]
)


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product over the leading axis of ``(3, ...)`` arrays."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _rotation_y(angle: float) -> np.ndarray:
    """``(3, 3)`` rotation about the world ``y`` axis mapping local to world vectors."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@dataclass(frozen=True)
class _Texture:
    """Solid texture: blends two albedos by a pattern evaluated at 3-D texture coordinates."""

    kind: Literal["checker", "stripes", "noise"]
    colour_a: np.ndarray
    colour_b: np.ndarray
    scale: float
    offset: np.ndarray
    direction: np.ndarray
    hash_seed: int

    def albedo(self, coords: np.ndarray) -> np.ndarray:
        """Albedo ``(3, M)`` in [0, 1] at texture coordinates ``(3, M)`` (metres)."""
        q = coords / self.scale + self.offset[:, None]
        if self.kind == "checker":
            v = (np.floor(q).sum(axis=0) % 2).astype(np.float64)
        elif self.kind == "stripes":
            v = (np.floor(_dot(self.direction, q) * 2.0) % 2).astype(np.float64)
        else:
            v = 0.65 * _value_noise(q, self.hash_seed) + 0.35 * _value_noise(2.7 * q, self.hash_seed + 1)
        return self.colour_a[:, None] * (1.0 - v) + self.colour_b[:, None] * v


def _lattice_hash(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """Pseudo-random values in [0, 1) for integer lattice points (arrays of equal shape)."""
    with np.errstate(over="ignore"):
        h = (ix * 73856093) ^ (iy * 19349663) ^ (iz * 83492791) ^ (seed * 2654435761)
        h = h.astype(np.uint64)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return (h >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def _value_noise(q: np.ndarray, seed: int) -> np.ndarray:
    """Smooth 3-D value noise in [0, 1] at points ``(3, M)``, lattice spacing 1."""
    base = np.floor(q)
    frac = q - base
    w = frac * frac * (3.0 - 2.0 * frac)
    i = base.astype(np.int64)
    out = np.zeros(q.shape[1])
    for dx in (0, 1):
        wx = w[0] if dx else 1.0 - w[0]
        for dy in (0, 1):
            wy = w[1] if dy else 1.0 - w[1]
            for dz in (0, 1):
                wz = w[2] if dz else 1.0 - w[2]
                out += wx * wy * wz * _lattice_hash(i[0] + dx, i[1] + dy, i[2] + dz, seed)
    return out


@dataclass(frozen=True)
class _Sphere:
    centre: np.ndarray
    radius: float
    texture: _Texture
    label: int = _SPHERE

    @property
    def footprint(self) -> float:
        return self.radius

    @property
    def xz(self) -> tuple[float, float]:
        return float(self.centre[0]), float(self.centre[2])

    def hit(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Ray parameter ``(N,)`` of the first hit (inf on a miss); ``o`` ``(3, 1|N)``, ``d`` ``(3, N)`` unit."""
        oc = o - self.centre[:, None]
        b = _dot(oc, d)
        disc = b * b - (_dot(oc, oc) - self.radius**2)
        t = np.full(d.shape[1], np.inf)
        ok = disc > 0.0
        root = np.sqrt(disc[ok])
        bb = np.broadcast_to(b, t.shape)[ok]
        near, far = -bb - root, -bb + root
        t[ok] = np.where(near > _EPS, near, np.where(far > _EPS, far, np.inf))
        return t

    def normal(self, p: np.ndarray) -> np.ndarray:
        n = p - self.centre[:, None]
        return n / np.sqrt(_dot(n, n))

    def texture_coords(self, p: np.ndarray) -> np.ndarray:
        return p - self.centre[:, None]


@dataclass(frozen=True)
class _Box:
    centre: np.ndarray
    half: np.ndarray
    yaw: float
    texture: _Texture
    label: int = _BOX

    @property
    def rotation(self) -> np.ndarray:
        return _rotation_y(self.yaw)

    @property
    def footprint(self) -> float:
        return float(np.hypot(self.half[0], self.half[2]))

    @property
    def xz(self) -> tuple[float, float]:
        return float(self.centre[0]), float(self.centre[2])

    def to_local(self, v: np.ndarray) -> np.ndarray:
        """World vectors ``(3, M)`` expressed in the box frame (rotation only)."""
        return self.rotation.T @ v

    def hit(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Ray parameter ``(N,)`` of the first hit (inf on a miss), slab method in the box frame."""
        ol = self.to_local(o - self.centre[:, None])
        dl = self.to_local(d)
        h = self.half[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / dl
            t1 = (-h - ol) * inv
            t2 = (h - ol) * inv
        t_near = np.minimum(t1, t2).max(axis=0)
        t_far = np.maximum(t1, t2).min(axis=0)
        t_near = np.where(t_near > _EPS, t_near, t_far)
        return np.where((t_near <= t_far) & (t_near > _EPS), t_near, np.inf)

    def _face_axis(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hit face of points ``(3, M)`` on the box: local axis ``(M,)`` and outward sign ``(M,)``."""
        pl = self.to_local(p - self.centre[:, None])
        axis = np.abs(pl / self.half[:, None]).argmax(axis=0)
        sign = np.sign(np.take_along_axis(pl, axis[None], axis=0)[0])
        return axis, sign

    def normal(self, p: np.ndarray) -> np.ndarray:
        axis, sign = self._face_axis(p)
        n_local = np.zeros_like(p)
        n_local[axis, np.arange(p.shape[1])] = sign
        return self.rotation @ n_local

    def texture_coords(self, p: np.ndarray) -> np.ndarray:
        return self.to_local(p - self.centre[:, None])

    def parts(self, p: np.ndarray, camera: np.ndarray) -> np.ndarray:
        """Part ids ``(M,)`` of points ``(3, M)``: top, front (the vertical face turned most towards
        the camera position ``(3,)``) or side (the other vertical faces and the underside)."""
        axis, sign = self._face_axis(p)
        to_camera = self.to_local((camera - self.centre)[:, None])[:, 0]
        front_axis = 0 if abs(to_camera[0]) >= abs(to_camera[2]) else 2
        front_sign = np.sign(to_camera[front_axis])
        out = np.full(p.shape[1], _PART_SIDE, dtype=np.int64)
        out[(axis == front_axis) & (sign == front_sign)] = _PART_FRONT
        out[(axis == 1) & (sign > 0)] = _PART_TOP
        return out


@dataclass(frozen=True)
class _Cylinder:
    base: np.ndarray
    radius: float
    height: float
    texture: _Texture
    label: int = _CYLINDER

    @property
    def footprint(self) -> float:
        return self.radius

    @property
    def xz(self) -> tuple[float, float]:
        return float(self.base[0]), float(self.base[2])

    def hit(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Ray parameter ``(N,)`` of the first hit (inf on a miss): mantle or one of the two caps."""
        n = d.shape[1]
        y0, y1 = self.base[1], self.base[1] + self.height
        ox = np.broadcast_to(o[0] - self.base[0], (n,))
        oy = np.broadcast_to(o[1], (n,))
        oz = np.broadcast_to(o[2] - self.base[2], (n,))
        a = d[0] * d[0] + d[2] * d[2]
        b = ox * d[0] + oz * d[2]
        c = ox * ox + oz * oz - self.radius**2
        disc = b * b - a * c
        t = np.full(n, np.inf)
        ok = (disc > 0.0) & (a > 1e-12)
        t_side = (-b[ok] - np.sqrt(disc[ok])) / a[ok]
        y_side = oy[ok] + t_side * d[1][ok]
        t[ok] = np.where((t_side > _EPS) & (y_side >= y0) & (y_side <= y1), t_side, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            for y_cap in (y0, y1):
                t_cap = (y_cap - oy) / d[1]
                rx, rz = ox + t_cap * d[0], oz + t_cap * d[2]
                valid = (t_cap > _EPS) & (rx * rx + rz * rz <= self.radius**2)
                t = np.where(valid & (t_cap < t), t_cap, t)
        return t

    def _on_cap(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks ``(M,)`` of points on the top cap and on the bottom cap."""
        y0, y1 = self.base[1], self.base[1] + self.height
        radial = np.hypot(p[0] - self.base[0], p[2] - self.base[2])
        d_side = np.abs(radial - self.radius)
        top = np.abs(p[1] - y1) < d_side
        bottom = ~top & (np.abs(p[1] - y0) < d_side)
        return top, bottom

    def normal(self, p: np.ndarray) -> np.ndarray:
        n = np.stack((p[0] - self.base[0], np.zeros(p.shape[1]), p[2] - self.base[2]))
        n /= np.sqrt(_dot(n, n))
        top, bottom = self._on_cap(p)
        n[:, top] = np.array([[0.0], [1.0], [0.0]])
        n[:, bottom] = np.array([[0.0], [-1.0], [0.0]])
        return n

    def texture_coords(self, p: np.ndarray) -> np.ndarray:
        return p - self.base[:, None]


_Object = _Sphere | _Box | _Cylinder


@dataclass(frozen=True)
class _Scene:
    room: np.ndarray  # (width, height, depth) in metres
    camera: np.ndarray  # (3,) camera centre in world coordinates
    rotation: np.ndarray  # (3, 3) columns: camera x (right), y (down), z (forward) in world coordinates
    hfov: float  # horizontal field of view in radians
    light: np.ndarray  # (3,) point light position
    ambient: float
    diffuse: float
    noise_sigma: float
    plane_textures: tuple[_Texture, ...]
    objects: tuple[_Object, ...]


def _random_texture(rng: np.random.Generator, saturated: bool) -> _Texture:
    """Two-colour solid texture; room surfaces get muted colours, objects saturated ones."""
    hue = rng.uniform()
    sat = rng.uniform(0.45, 0.9) if saturated else rng.uniform(0.05, 0.35)
    val = rng.uniform(0.55, 0.95) if saturated else rng.uniform(0.5, 0.9)
    colour_a = np.array(colorsys.hsv_to_rgb(hue, sat, val))
    hue_b = (hue + rng.uniform(-0.15, 0.15)) % 1.0 if rng.uniform() < 0.6 else rng.uniform()
    colour_b = np.array(colorsys.hsv_to_rgb(hue_b, sat * rng.uniform(0.5, 1.0), val * rng.uniform(0.45, 0.85)))
    direction = rng.normal(size=3)
    return _Texture(
        kind=("checker", "stripes", "noise")[int(rng.integers(3))],
        colour_a=colour_a,
        colour_b=colour_b,
        scale=float(rng.uniform(0.08, 0.5) if saturated else rng.uniform(0.2, 1.0)),
        offset=rng.uniform(0.0, 1.0, size=3),
        direction=direction / np.linalg.norm(direction),
        hash_seed=int(rng.integers(1 << 30)),
    )


def _sample_object(rng: np.random.Generator, x: float, z: float, room: np.ndarray) -> _Object:
    """One object of random type and size on the floor at ``(x, z)``, or floating above it."""
    kind = int(rng.integers(3))
    texture = _random_texture(rng, saturated=True)
    lift = float(rng.uniform(0.2, 0.9)) if rng.uniform() < 0.3 else 0.0
    if kind == 0:
        radius = float(rng.uniform(0.25, 0.6))
        return _Sphere(np.array([x, radius + lift, z]), radius, texture)
    if kind == 1:
        half = np.array([rng.uniform(0.2, 0.6), rng.uniform(0.15, 0.6), rng.uniform(0.2, 0.6)])
        yaw = float(rng.uniform(0.0, np.pi / 2)) if rng.uniform() < 0.7 else 0.0
        return _Box(np.array([x, half[1] + lift, z]), half, yaw, texture)
    height = float(min(rng.uniform(0.3, 1.5), room[1] - lift - 0.3))
    return _Cylinder(np.array([x, lift, z]), float(rng.uniform(0.15, 0.4)), height, texture)


def _sample_scene(rng: np.random.Generator) -> _Scene:
    """Room, camera, light and 2-6 non-overlapping objects in front of the camera."""
    room = np.array([rng.uniform(4.0, 7.0), rng.uniform(2.6, 3.4), rng.uniform(6.0, 10.0)])
    camera = np.array([rng.uniform(-0.25, 0.25) * room[0], rng.uniform(1.1, 1.8), rng.uniform(0.3, 0.8)])
    yaw = rng.uniform(-0.25, 0.25)
    pitch = rng.uniform(0.12, 0.42)
    hfov = float(np.deg2rad(rng.uniform(55.0, 70.0)))
    forward = np.array([np.sin(yaw) * np.cos(pitch), -np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = np.array([np.cos(yaw), 0.0, -np.sin(yaw)])
    down = np.cross(right, forward)
    rotation = np.stack((right, down, forward), axis=1)
    light = np.array(
        [rng.uniform(-0.4, 0.4) * room[0], room[1] - rng.uniform(0.1, 0.4), rng.uniform(0.8, 0.7 * room[2])]
    )
    plane_textures = tuple(_random_texture(rng, saturated=False) for _ in range(_NUM_PLANES))

    objects: list[_Object] = []
    for _ in range(int(rng.integers(2, 7))):
        for _attempt in range(50):
            angle = yaw + rng.uniform(-0.4, 0.4) * hfov
            dist = rng.uniform(2.0, 6.5)
            x, z = camera[0] + dist * np.sin(angle), camera[2] + dist * np.cos(angle)
            obj = _sample_object(rng, x, z, room)
            r = obj.footprint
            inside = abs(x) + r < room[0] / 2 - 0.05 and r + 0.05 < z < room[2] - r - 0.05
            free = all(np.hypot(x - other.xz[0], z - other.xz[1]) > r + other.footprint + 0.05 for other in objects)
            if inside and free:
                objects.append(obj)
                break
    return _Scene(
        room=room,
        camera=camera,
        rotation=rotation,
        hfov=hfov,
        light=light,
        ambient=float(rng.uniform(0.2, 0.35)),
        diffuse=float(rng.uniform(1.05, 1.4)),
        noise_sigma=float(rng.uniform(0.005, 0.02)),
        plane_textures=plane_textures,
        objects=tuple(objects),
    )


def _intrinsics(hfov: float, height: int, width: int) -> np.ndarray:
    """``(3, 3)`` pinhole matrix with square pixels and the principal point at the image centre."""
    f = (width / 2.0) / np.tan(hfov / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def _room_hit(scene: _Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where rays ``d`` ``(3, N)`` from ``o`` ``(3, 1)`` inside the room leave it.

    Returns the ray parameter ``(N,)`` and the instance ``(N,)`` of the room plane hit.
    """
    width, height, depth = scene.room
    lo = np.array([[-width / 2.0], [0.0], [0.0]])
    hi = np.array([[width / 2.0], [height], [depth]])
    with np.errstate(divide="ignore", invalid="ignore"):
        t_axis = np.where(d > 0.0, (hi - o) / d, (lo - o) / d)
    t_axis[d == 0.0] = np.inf
    axis = t_axis.argmin(axis=0)
    t = np.take_along_axis(t_axis, axis[None], axis=0)[0]
    upper = np.take_along_axis(d, axis[None], axis=0)[0] > 0.0
    return t, _PLANE_BY_EXIT[2 * axis + upper]


def _render(scene: _Scene, rng: np.random.Generator, height: int, width: int, parts: bool) -> dict[str, np.ndarray]:
    """Cast one ray per pixel centre through ``scene`` and return the image and all labels."""
    k = _intrinsics(scene.hfov, height, width)
    jj, ii = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    d_cam = np.stack(((jj - k[0, 2]) / k[0, 0], (ii - k[1, 2]) / k[1, 1], np.ones_like(jj))).reshape(3, -1)
    d_cam /= np.sqrt(_dot(d_cam, d_cam))
    d = scene.rotation @ d_cam
    o = scene.camera[:, None]

    t, instance = _room_hit(scene, o, d)
    for index, obj in enumerate(scene.objects):
        t_obj = obj.hit(o, d)
        closer = t_obj < t
        t = np.where(closer, t_obj, t)
        instance = np.where(closer, _NUM_PLANES + index, instance)
    p = o + t * d

    n_pix = d.shape[1]
    normal = np.empty((3, n_pix))
    albedo = np.empty((3, n_pix))
    label = np.empty(n_pix, dtype=np.int64)
    part = np.zeros(n_pix, dtype=np.int64)
    for inst in np.unique(instance):
        mask = instance == inst
        pts = p[:, mask]
        if inst < _NUM_PLANES:
            _, _, plane_label, plane_normal = _PLANES[inst]
            normal[:, mask] = np.array(plane_normal)[:, None]
            albedo[:, mask] = scene.plane_textures[inst].albedo(pts)
            label[mask] = plane_label
            continue
        obj = scene.objects[inst - _NUM_PLANES]
        normal[:, mask] = obj.normal(pts)
        albedo[:, mask] = obj.texture.albedo(obj.texture_coords(pts))
        label[mask] = obj.label
        if parts and isinstance(obj, _Box):
            part[mask] = obj.parts(pts, scene.camera)

    to_light = scene.light[:, None] - p
    dist = np.sqrt(_dot(to_light, to_light))
    to_light /= dist
    lambert = np.maximum(_dot(normal, to_light), 0.0)
    lit = np.flatnonzero(lambert > 0.0)
    origins = p[:, lit] + 1e-3 * normal[:, lit]
    for obj in scene.objects:
        blocked = obj.hit(origins, to_light[:, lit]) < dist[lit]
        lambert[lit[blocked]] = 0.0
    falloff = 1.0 / (1.0 + (dist / _LIGHT_FALLOFF) ** 2)
    radiance = albedo * (scene.ambient + scene.diffuse * lambert * falloff)
    image = np.clip(radiance, 0.0, 1.0) ** (1.0 / 2.2)
    image = image.reshape(3, height, width).transpose(1, 2, 0)
    image = image + rng.normal(0.0, scene.noise_sigma, size=image.shape)

    normal_cam = scene.rotation.T @ normal
    normal_cam[2] *= -1.0
    out = {
        "image": np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8),
        "semseg": label.reshape(height, width),
        "depth": (t * d_cam[2]).reshape(height, width).astype(np.float32),
        "normals": normal_cam.reshape(3, height, width).astype(np.float32),
        "instance": instance.reshape(height, width).astype(np.int32),
        "intrinsics": k.astype(np.float32),
    }
    if parts:
        is_box = label == _BOX
        part = part if is_box.any() else np.full(n_pix, IGNORE_INDEX, dtype=np.int64)
        out["human_parts"] = part.reshape(height, width)
    return out


def render_scene(seed: int, height: int, width: int, parts: bool = True) -> dict[str, np.ndarray]:
    """Sample the scene of ``seed`` and render it at ``height x width`` (deterministic per seed).

    The scene itself (room, camera pose, field of view, objects, textures, light) depends on the
    seed only, so one seed rendered at two resolutions shows the same scene.

    Returns:
        A dict of NumPy arrays:
        ``image`` uint8 ``(H, W, 3)`` RGB;
        ``semseg`` int64 ``(H, W)`` indices into ``CLASS_NAMES``;
        ``depth`` float32 ``(H, W)`` z-depth in metres (every pixel hits a surface, all > 0);
        ``normals`` float32 ``(3, H, W)`` unit normals (x right, y down, z towards the camera);
        ``instance`` int32 ``(H, W)`` instance ids (room planes 0-5, objects from 6);
        ``intrinsics`` float32 ``(3, 3)`` pinhole matrix (pixel indices, see the module notes);
        with ``parts``, ``human_parts`` int64 ``(H, W)`` indices into ``PART_NAMES`` on box pixels
        and 0 elsewhere, or 255 everywhere when no box is visible.
    """
    rng = np.random.default_rng(seed)
    return _render(_sample_scene(rng), rng, height, width, parts)


def boundary_map(instance: np.ndarray) -> np.ndarray:
    """One-pixel-thin boundaries of an instance map.

    A pixel is a boundary (1) when its right or lower neighbour belongs to another instance,
    so every boundary between two regions is marked on the left/upper side only.

    Args:
        instance: ``(H, W)`` integer instance ids.

    Returns:
        float32 ``(H, W)`` in {0, 1}.
    """
    edge = np.zeros(instance.shape, dtype=bool)
    edge[:, :-1] |= instance[:, :-1] != instance[:, 1:]
    edge[:-1, :] |= instance[:-1, :] != instance[1:, :]
    return edge.astype(np.float32)


def scene_seed(seed: int, split: str, index: int) -> int:
    """Seed of scene ``index`` of ``split`` in the dataset ``seed`` (non-negative ints).

    Derived through ``numpy.random.SeedSequence`` from ``(seed, split, index)``, so the splits
    of one dataset, and datasets of different seeds, draw independent scenes.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
    state = np.random.SeedSequence([seed, SPLITS.index(split), index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _record_dtype(height: int, width: int, parts: bool) -> np.dtype:
    """Structured dtype of one cached sample: every raw array of ``render_scene`` but the intrinsics."""
    fields = [
        ("depth", "<f4", (height, width)),
        ("normals", "<f4", (3, height, width)),
        ("image", "u1", (height, width, 3)),
        ("semseg", "u1", (height, width)),
        ("instance", "u1", (height, width)),
    ]
    if parts:
        fields.append(("human_parts", "u1", (height, width)))
    return np.dtype(fields)


def _render_record(seed: int, height: int, width: int, parts: bool) -> np.ndarray:
    """``render_scene`` packed into a 0-d array of ``_record_dtype``."""
    out = render_scene(seed, height, width, parts)
    record = np.zeros((), dtype=_record_dtype(height, width, parts))
    for name in record.dtype.names:
        record[name] = out[name]
    return record


def _write_split(path: Path, seeds: Sequence[int], height: int, width: int, parts: bool) -> None:
    """Render ``seeds`` into the ``.npy`` file ``path`` atomically (temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        records = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=_record_dtype(height, width, parts), shape=(len(seeds),)
        )
        for i, seed in enumerate(seeds):
            records[i] = _render_record(seed, height, width, parts)
        records.flush()
        del records
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """``$POLYTASK_CACHE/synthscenes`` when the variable is set, else ``~/.cache/polytask/synthscenes``."""
    root = os.environ.get("POLYTASK_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "polytask") / "synthscenes"


class SynthScenes(Dataset):
    """Procedurally rendered multi-task scenes (see the module notes), deterministic per seed.

    Scene ``index`` of ``split`` is ``render_scene(scene_seed(seed, split, index), H, W)``, so
    the splits never share scenes and a longer split extends a shorter one. The whole split is
    rendered once, on the first access or by ``prepare()``, into one uncompressed ``.npy``
    file under ``cache_dir`` keyed by (version, seed, split, num_samples, size, parts), and is
    memory-mapped afterwards (call ``prepare()`` before starting DataLoader workers so they
    do not all render it).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        num_samples: number of scenes in the split.
        image_size: ``(H, W)`` of images and labels.
        seed: dataset seed (non-negative).
        tasks: labels to return, a subset of ``TASKS``.
        cache_dir: folder of the rendered splits; ``None`` for ``default_cache_dir()``.
        transform: applied to every sample dict before it is returned.

    A sample is the dict of the sample contract: ``image`` float32 ``(3, H, W)`` normalised with
    ``IMAGENET_MEAN``/``IMAGENET_STD``; the requested tasks: ``semseg``, ``human_parts`` and
    ``sal`` int64 ``(H, W)``, ``depth`` and ``edge`` float32 ``(1, H, W)``, ``normals`` float32
    ``(3, H, W)``; and ``meta`` ``{"id": f"{split}_{index:06d}", "size": (H, W)}``.
    """

    def __init__(
        self,
        split: Literal["train", "val", "test"] = "train",
        num_samples: int = 2000,
        image_size: tuple[int, int] = (96, 128),
        seed: int = 0,
        tasks: Sequence[str] = TASKS,
        cache_dir: str | Path | None = None,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"unknown SynthScenes task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
        self.split = split
        self.num_samples = int(num_samples)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.tasks = tuple(tasks)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.transform = transform
        self._parts = "human_parts" in self.tasks
        self._records: np.ndarray | None = None

    @property
    def cache_path(self) -> Path:
        """The ``.npy`` file holding this split."""
        h, w = self.image_size
        parts = "parts" if self._parts else "noparts"
        name = f"synthscenes_v{VERSION}_seed{self.seed}_{self.split}_n{self.num_samples}_{h}x{w}_{parts}.npy"
        return self.cache_dir / name

    def prepare(self) -> Path:
        """Render the split into ``cache_path`` unless it is there; returns ``cache_path``.

        Processes preparing the same split at once (parallel study runs) render it once: the
        others wait on a lock file beside the cache and then read what the first one wrote.
        """
        path = self.cache_path
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                seeds = [scene_seed(self.seed, self.split, i) for i in range(self.num_samples)]
                _write_split(path, seeds, *self.image_size, self._parts)
        return path

    def _load(self) -> np.ndarray:
        if self._records is None:
            records = np.load(self.prepare(), mmap_mode="r")
            expected = _record_dtype(*self.image_size, self._parts)
            if records.dtype != expected or records.shape != (self.num_samples,):
                raise ValueError(f"{self.cache_path} does not hold this split; delete it to render it again")
            self._records = records
        return self._records

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        record = self._load()[index]
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        image = torch.from_numpy(np.array(record["image"])).permute(2, 0, 1).float().div_(255.0)
        sample: dict = {"image": (image - mean) / std}
        semseg = np.array(record["semseg"], dtype=np.int64)
        for task in self.tasks:
            if task == "semseg":
                sample[task] = torch.from_numpy(semseg)
            elif task == "depth":
                sample[task] = torch.from_numpy(np.array(record["depth"])[None])
            elif task == "normals":
                sample[task] = torch.from_numpy(np.array(record["normals"]))
            elif task == "edge":
                sample[task] = torch.from_numpy(boundary_map(record["instance"])[None])
            elif task == "sal":
                sample[task] = torch.from_numpy((semseg >= _SPHERE).astype(np.int64))
            else:
                sample[task] = torch.from_numpy(np.array(record["human_parts"], dtype=np.int64))
        sample["meta"] = {"id": f"{self.split}_{index:06d}", "size": self.image_size}
        return self.transform(sample) if self.transform is not None else sample


class SynthScenesDataModule(MultiTaskDataModule):
    """SynthScenes: the embedded procedurally generated dataset (no download).

    Args:
        tasks: subset of semseg, depth, normals, edge, sal, human_parts (default: all).
        num_train: training scenes.
        num_val: scenes of the validation split and of the test split (``test`` and ``predict`` use the latter).
        image_size: ``(H, W)`` of rendered images.
        seed: base seed; every scene is a deterministic function of (seed, split, index).
        flip: random horizontal flips during training.
        cache_dir: where rendered splits are cached (default ``$POLYTASK_CACHE`` or ``~/.cache/polytask``).
        batch_size: images per training batch.
        kwargs: further options of :class:`MultiTaskDataModule` (``eval_batch_size``, ``num_workers``,
            ``predict_dir``, ``predict_size``).
    """

    name = "synthscenes"

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        num_train: int = 2000,
        num_val: int = 200,
        image_size: tuple[int, int] = (96, 128),
        seed: int = 0,
        flip: bool = True,
        cache_dir: str | None = None,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        self.num_train = num_train
        self.num_val = num_val
        self.image_size = tuple(image_size)
        self.seed = seed
        self.flip = flip
        self.cache_dir = Path(cache_dir) if cache_dir else None
        super().__init__(tasks=tasks, batch_size=batch_size, **kwargs)

    def available_tasks(self) -> list[Task]:
        return [
            build_task("semseg", num_classes=len(CLASS_NAMES), class_names=CLASS_NAMES),
            build_task("depth"),
            build_task("normals"),
            build_task("edge"),
            build_task("sal"),
            build_task("human_parts", num_classes=len(PART_NAMES), class_names=PART_NAMES),
        ]

    def default_loss_weights(self) -> Mapping[str, float]:
        return DEFAULT_LOSS_WEIGHTS

    def prepare_data(self) -> None:
        """Render the training and validation splits into the cache (once, before any worker starts)."""
        for split in ("train", "val"):
            self._dataset(split).prepare()

    def make_dataset(self, split: str) -> Dataset:
        train = split == "train"
        return SynthScenes(
            split="test" if split == "predict" else split,
            num_samples=self.num_train if train else self.num_val,
            image_size=self.image_size,
            seed=self.seed,
            tasks=self.task_names,
            cache_dir=self.cache_dir,
            transform=RandomHorizontalFlip(kinds=transform_kinds(self.tasks)) if (train and self.flip) else None,
        )
