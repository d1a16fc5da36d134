"""Problems of dataset files: the checks of one sample and one split, and the cached quick check
that :class:`~polytask.data.file_datamodule.FileDataModule` runs in ``setup()``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from polytask.data.io import DataFileError, FileDataset, ProblemKind, probe

log = logging.getLogger(__name__)


CHECK_VERSION = 1
"""Part of the cache key of quick checks; bump it when the checks change."""


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset.

    Attributes:
        split: the on-disk split (``-`` for the whole dataset).
        sample: the sample id (``-`` for a split-level problem).
        role: ``image``, the task or the file role concerned (``-`` when none).
        kind: the kind of problem.
        path: the file or folder.
        detail: a sentence for the user.
    """

    split: str
    sample: str
    role: str
    kind: ProblemKind
    path: str
    detail: str


class BrokenDatasetError(RuntimeError):
    """Raised by ``setup()`` when a split has bad samples and ``on_bad_samples="error"``."""

    def __init__(self, message: str, problems: Sequence[Problem]) -> None:
        super().__init__(message)
        self.problems = list(problems)


def problem_from_error(split: str, sample: str, role: str, err: DataFileError) -> Problem:
    return Problem(split, sample, role, err.kind, str(err.path), err.detail)


def check_sample(dataset: FileDataset, split: str, index: int, full: bool) -> list[Problem]:
    """Every problem of sample ``index``: each file probed, target sizes against the image, decoded values when ``full``."""
    sample = dataset.ids[index]
    found: dict[tuple[str, ProblemKind], Problem] = {}

    def add(role: str, err: DataFileError) -> None:
        found.setdefault((str(err.path), err.kind), problem_from_error(split, sample, role, err))

    try:
        files = dataset.files(index)
    except DataFileError as err:
        return [problem_from_error(split, sample, "-", err)]
    shapes: dict[str, tuple[int, ...] | None] = {}
    for role, data_file in files.items():
        try:
            shapes[role] = probe(data_file.path, data_file.mat_key)
        except DataFileError as err:
            add(role, err)
    image_shape = shapes.get("image")
    if image_shape is not None:
        for role, data_file in files.items():
            shape = shapes.get(role)
            if role != "image" and data_file.spatial and shape is not None and shape[:2] != image_shape[:2]:
                detail = f"size {shape[:2]} differs from the image's {image_shape[:2]}"
                add(role, DataFileError(data_file.path, "shape_mismatch", detail))
    if full:
        try:
            dataset.load_image(index)
        except DataFileError as err:
            add("image", err)
        for task in dataset.tasks:
            try:
                dataset.validated_target(index, task)
            except DataFileError as err:
                add(task, err)
    return list(found.values())


def check_split(dataset: FileDataset, split: str, full: bool) -> list[Problem]:
    """Every problem of every sample of ``dataset`` (see :func:`check_sample`)."""
    return [p for index in range(len(dataset)) for p in check_sample(dataset, split, index, full)]


def _cache_dir() -> Path:
    return Path(os.environ.get("POLYTASK_CACHE", Path.home() / ".cache" / "polytask")) / "checks"


def _signature(paths: Iterable[Path]) -> str:
    digest = hashlib.sha1()
    for path in sorted(set(paths)):
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def cached_quick_check(name: str, root: Path, dataset: FileDataset, split: str, extra_files: Sequence[Path] = ()) -> list[Problem]:
    """The quick check of one split, reused while no file of the split (nor ``extra_files``) changes.

    The cache lives under ``$POLYTASK_CACHE/checks`` (default ``~/.cache/polytask/checks``).
    """
    key = json.dumps([CHECK_VERSION, name, str(root.resolve()), split, sorted(dataset.tasks), dataset.ids])
    cache = _cache_dir() / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.json"
    paths: list[Path] = list(extra_files)
    for index in range(len(dataset)):
        try:
            paths.extend(f.path for f in dataset.files(index).values())
        except DataFileError as err:
            paths.append(err.path)
    signature = _signature(paths)
    if cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("signature") == signature:
                return [Problem(**p) for p in stored["problems"]]
        except (OSError, ValueError, TypeError):
            log.debug("ignoring unreadable check cache %s", cache)
    problems = check_split(dataset, split, full=False)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"signature": signature, "problems": [asdict(p) for p in problems]}))
    except OSError as err:
        log.debug("cannot write check cache %s: %s", cache, err)
    return problems
