"""Reading dataset files with errors that name the file, header-level probes, and the file-backed Dataset base.

Every reader raises :class:`DataFileError` (with the path and a problem kind) instead of the
assorted PIL / NumPy / SciPy exceptions, so a broken dataset is reported the same way
everywhere: by ``polytask data check``, by a datamodule's ``setup()`` and while training.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.io
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from polytask.tasks import Task

ProblemKind = Literal["layout", "missing", "unreadable", "truncated", "format", "shape_mismatch", "out_of_range", "nan"]


class DataFileError(Exception):
    """A dataset file that is missing, unreadable or holds invalid values.

    Attributes:
        path: the offending file (or folder).
        kind: what is wrong with it.
        detail: a sentence for the user.
    """

    def __init__(self, path: str | Path, kind: ProblemKind, detail: str) -> None:
        self.path = Path(path)
        self.kind: ProblemKind = kind
        self.detail = detail
        super().__init__(f"{self.path}: {detail}")


def require_file(path: Path) -> Path:
    """``path`` if it is a file, else :class:`DataFileError` (``missing``)."""
    if not path.is_file():
        raise DataFileError(path, "missing", "file not found")
    return path


_JPEG_SUFFIXES = (".jpg", ".jpeg")
_TAIL_BYTES = 1024


def _check_complete(path: Path) -> None:
    """Raise ``truncated`` for a JPEG / PNG that cannot be decoded to its end.

    Quick path: the end-of-image marker (JPEG) or IEND chunk (PNG) is in the last kilobyte. Only
    files without it (truncated, or with trailing data) are decoded in full.
    """
    suffix = path.suffix.lower()
    if suffix not in _JPEG_SUFFIXES and suffix != ".png":
        return
    with path.open("rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(size - _TAIL_BYTES, 0))
        tail = f.read()
    if (b"\xff\xd9" if suffix in _JPEG_SUFFIXES else b"IEND") in tail:
        return
    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise DataFileError(path, "truncated", f"file is truncated ({err})") from err


def _open_image(path: Path) -> Image.Image:
    require_file(path)
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataFileError(path, "unreadable", f"not a readable image ({err})") from err


def _load_pixels(path: Path, img: Image.Image) -> Image.Image:
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise DataFileError(path, "truncated" if "truncated" in str(err) else "unreadable", f"cannot decode ({err})") from err
    return img


def read_rgb(path: Path) -> np.ndarray:
    """An image as RGB uint8 ``(H, W, 3)``."""
    with _open_image(path) as img:
        return np.asarray(_load_pixels(path, img).convert("RGB"))


def read_resized_rgb(path: Path, size: tuple[int, int]) -> np.ndarray:
    """An image as RGB, resized with PIL's (antialiased) bilinear filter to ``size`` ``(h, w)``: uint8 ``(h, w, 3)``."""
    with _open_image(path) as img:
        rgb = _load_pixels(path, img).convert("RGB")
        if rgb.size != (size[1], size[0]):
            rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(rgb)


def normals_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """Unit normals stored as an RGB image: uint8 ``(H, W, 3)`` -> float32 ``(H, W, 3)`` in [-1, 1]
    (``n = 2 * value / 255 - 1``, the encoding of the NYUD, PASCAL-Context and folder formats)."""
    return 2.0 * rgb.astype(np.float32) / 255.0 - 1.0


def read_png(path: Path, channels: int) -> np.ndarray:
    """The raw values of an image file (palette indices, not colours): ``(H, W)`` for 1 channel, ``(H, W, C)`` else.

    Raises:
        DataFileError: ``format`` when the file does not have ``channels`` channels.
    """
    with _open_image(path) as img:
        array = np.asarray(_load_pixels(path, img))
    found = 1 if array.ndim == 2 else array.shape[2]
    if found != channels:
        raise DataFileError(path, "format", f"expected {channels} channel(s), found {found} (mode {img.mode})")
    return array


def read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array (without pickles)."""
    require_file(path)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        _npy_shape(path)  # raises the precise error (unreadable header, truncated data) when there is one
        raise DataFileError(path, "unreadable", f"not a readable .npy file ({err})") from err


def read_mat(path: Path) -> dict[str, Any]:
    """The variables of a MATLAB ``.mat`` file (``scipy.io.loadmat`` defaults: records, no squeezing)."""
    require_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return scipy.io.loadmat(path)
    except Exception as err:  # scipy raises many kinds (ValueError, TypeError, MatReadError, zlib.error)
        raise DataFileError(path, "unreadable", f"not a readable .mat file ({err})") from err


def mat_array(path: Path, key: str) -> np.ndarray:
    """Variable ``key`` of a ``.mat`` file as an array."""
    variables = read_mat(path)
    if key not in variables:
        found = sorted(k for k in variables if not k.startswith("__"))
        raise DataFileError(path, "format", f"no variable {key!r} (found {found})")
    return np.asarray(variables[key])


def as_2d(array: np.ndarray, path: Path) -> np.ndarray:
    """An ``(H, W)`` view of a map stored as ``(H, W)``, ``(H, W, 1)`` or ``(1, H, W)``."""
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[2]):
        array = array.reshape(array.shape[:2] if array.shape[2] == 1 else array.shape[1:])
    if array.ndim != 2:
        raise DataFileError(path, "format", f"expected a 2-D map, found shape {array.shape}")
    return array


def _npy_shape(path: Path) -> tuple[int, ...]:
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        except ValueError as err:
            raise DataFileError(path, "unreadable", f"not a .npy file ({err})") from err
        offset = f.tell()
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if path.stat().st_size - offset < expected:
        raise DataFileError(path, "truncated", f"holds fewer bytes than its {shape} {dtype} header declares")
    return tuple(int(s) for s in shape)


def probe(path: Path, mat_key: str | None = None) -> tuple[int, ...] | None:
    """Header-level check of a file, without decoding it; returns its array shape when known.

    Images: PIL header and end marker (``(H, W)`` or ``(H, W, C)``). ``.npy``: header and file
    length. ``.mat``: the variable table (the shape of ``mat_key`` if given, else None).

    Raises:
        DataFileError: the file is missing, unreadable or truncated.
    """
    require_file(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _npy_shape(path)
    if suffix == ".mat":
        try:
            variables = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
        except Exception as err:  # as in read_mat
            raise DataFileError(path, "unreadable", f"not a readable .mat file ({err})") from err
        if mat_key is None:
            return None
        if mat_key not in variables:
            raise DataFileError(path, "format", f"no variable {mat_key!r} (found {sorted(variables)})")
        return tuple(int(s) for s in variables[mat_key])
    with _open_image(path) as img:
        width, height = img.size
        bands = len(img.getbands())
    _check_complete(path)
    return (height, width) if bands == 1 else (height, width, bands)


@dataclass(frozen=True)
class DataFile:
    """One file a sample reads.

    Attributes:
        path: where it is.
        spatial: True when its map must have the image's height and width.
        mat_key: for ``.mat`` files, the variable whose shape is checked.
    """

    path: Path
    spatial: bool = True
    mat_key: str | None = None


class FileDataset(Dataset, ABC):
    """One split of a dataset stored as files, one sample per id.

    Subclasses implement :meth:`files`, :meth:`load_image` and :meth:`load_target`. A sample is the
    dict of the sample contract; before ``transform`` its image is float32 ``(3, H, W)`` in
    [0, 255] (unnormalised), and ``meta`` is ``{"id", "size"}``. Decoded targets are validated
    (class ids in range...): a violation raises :class:`DataFileError` naming the file.

    Args:
        ids: sample ids of the split, in order.
        tasks: the tasks to decode (``Task`` objects carry class counts for validation).
        transform: applied to every sample dict.
    """

    def __init__(self, ids: Sequence[str], tasks: Sequence[Task], transform: Callable[[dict], dict] | None = None) -> None:
        self.ids = list(ids)
        self.tasks = {t.name: t for t in tasks}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def files(self, index: int) -> dict[str, DataFile]:
        """The files of sample ``index`` by role: ``image`` and one role per file the tasks read."""

    @abstractmethod
    def load_image(self, index: int) -> torch.Tensor:
        """The image float32 ``(3, H, W)`` in [0, 255]."""

    @abstractmethod
    def load_target(self, index: int, task: str) -> torch.Tensor:
        """The decoded target of ``task`` (contract layout and dtype, before any transform)."""

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of the image of sample ``index``, from its header."""
        shape = probe(self.files(index)["image"].path)
        assert shape is not None
        return shape[0], shape[1]

    def target_file(self, index: int, task: str) -> Path:
        """The file named in errors about the target of ``task`` (default: the role named after the task)."""
        files = self.files(index)
        return files[task].path if task in files else files["image"].path

    def validated_target(self, index: int, task: str) -> torch.Tensor:
        """:meth:`load_target`, raising :class:`DataFileError` when the values break the contract."""
        value = self.load_target(index, task)
        problems = self.tasks[task].target_problems(value)
        if problems:
            kind, detail = problems[0]
            raise DataFileError(self.target_file(index, task), kind, detail)
        return value

    def seism_label_map(self, index: int, boundary_target: torch.Tensor) -> np.ndarray:
        """The label map ``(H, W)`` whose segment boundaries SEISM scores the boundaries of sample
        ``index`` against. Default: the boundary target ``(1, H, W)`` itself read as a label map
        (NYUD: the InvPT authors' SEISM wrapper reads ``edge/<id>.png``); datasets whose SEISM
        ground truth is another annotation override this."""
        return boundary_target[0].numpy()

    def drop(self, ids: set[str]) -> None:
        """Remove the samples of ``ids`` from the split."""
        self.ids = [i for i in self.ids if i not in ids]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.load_image(index)
        sample: dict[str, Any] = {"image": image}
        for name in self.tasks:
            sample[name] = self.validated_target(index, name)
        sample["meta"] = {"id": self.ids[index], "size": tuple(image.shape[-2:])}
        return self.transform(sample) if self.transform is not None else sample


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """RGB ``(H, W, 3)`` (any numeric dtype) -> float32 ``(3, H, W)``."""
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1).contiguous()


def check_same_size(map_shape: Sequence[int], image_shape: Sequence[int], path: Path) -> None:
    """Raise ``shape_mismatch`` when a target's ``(H, W)`` differs from the image's."""
    if tuple(map_shape[:2]) != tuple(image_shape[:2]):
        raise DataFileError(
            path, "shape_mismatch", f"size {tuple(map_shape[:2])} differs from the image's {tuple(image_shape[:2])}"
        )


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file (split lists)."""
    require_file(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataFileError(path, "unreadable", f"cannot read ({err})") from err
    return [line.strip() for line in text.splitlines() if line.strip()]
