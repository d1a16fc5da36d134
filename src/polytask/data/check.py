"""Dataset validation: ``polytask data check``, and datamodules that refuse broken datasets.

:func:`check_dataset` walks every split of a dataset directory and reports every problem at once
(missing split lists and files, unreadable or truncated files, shape mismatches between the image
and its targets and, in a full check, label values outside the class range and NaNs) with the
files involved, plus a per-split summary. :class:`FileDataModule` is the base of the datamodules
of datasets stored as files: its ``setup()`` runs the quick (header-level) check, cached per split
until a file changes, and stops with the list of bad samples unless ``on_bad_samples="skip"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from rich.console import Console
from rich.table import Table

from polytask.data.datamodule import MultiTaskDataModule
from polytask.data.io import DataFileError, FileDataset, ProblemKind, probe
from polytask.tasks import Task

log = logging.getLogger(__name__)

CHECK_VERSION = 1
"""Part of the cache key of quick checks; bump it when the checks change."""

_STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
    None: ("train", "val", "test", "predict"),
}
_MAX_LISTED = 20


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


@dataclass
class SplitSummary:
    """Counts of one split: samples listed, samples with at least one problem, problems."""

    samples: int = 0
    bad_samples: int = 0
    problems: int = 0


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`.

    Attributes:
        dataset: registry name of the dataset.
        root: the directory checked.
        problems: every problem found.
        splits: per-split counts.
        notes: facts about the layout (e.g. which NYUD version the root holds).
    """

    dataset: str
    root: Path
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def bad_ids(self, split: str) -> set[str]:
        """Ids of the samples of ``split`` with at least one problem."""
        return {p.sample for p in self.problems if p.split == split and p.sample != "-"}

    def _relative(self, path: str) -> str:
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return path

    def render(self, console: Console, max_rows: int = 200) -> None:
        """Print the notes, the per-split summary and (up to ``max_rows`` of) the problems."""
        for note in self.notes:
            console.print(note)
        summary = Table(title=f"{self.dataset} at {self.root}")
        for column in ("split", "samples", "bad samples", "problems"):
            summary.add_column(column, justify="left" if column == "split" else "right")
        for split, counts in self.splits.items():
            summary.add_row(split, str(counts.samples), str(counts.bad_samples), str(counts.problems))
        console.print(summary)
        if self.ok:
            console.print("[green]no problems found[/green]")
            return
        table = Table(title=f"{len(self.problems)} problem(s); files relative to {self.root}")
        for column in ("split", "sample", "problem", "file", "detail"):
            table.add_column(column, overflow="fold")
        for p in self.problems[:max_rows]:
            table.add_row(p.split, p.sample, p.kind, self._relative(p.path), p.detail)
        console.print(table)
        if len(self.problems) > max_rows:
            console.print(f"... and {len(self.problems) - max_rows} more")


class BrokenDatasetError(RuntimeError):
    """Raised by ``setup()`` when a split has bad samples and ``on_bad_samples="error"``."""

    def __init__(self, message: str, problems: Sequence[Problem]) -> None:
        super().__init__(message)
        self.problems = list(problems)


def _problem(split: str, sample: str, role: str, err: DataFileError) -> Problem:
    return Problem(split, sample, role, err.kind, str(err.path), err.detail)


def check_sample(dataset: FileDataset, split: str, index: int, full: bool) -> list[Problem]:
    """Every problem of sample ``index``: each file probed, target sizes against the image, decoded values when ``full``."""
    sample = dataset.ids[index]
    found: dict[tuple[str, ProblemKind], Problem] = {}

    def add(role: str, err: DataFileError) -> None:
        found.setdefault((str(err.path), err.kind), _problem(split, sample, role, err))

    try:
        files = dataset.files(index)
    except DataFileError as err:
        return [_problem(split, sample, "-", err)]
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


class FileDataModule(MultiTaskDataModule):
    """Base of the datamodules of datasets stored as files under ``root``.

    Subclasses implement :meth:`build_split` and :meth:`make_transform` (plus the task methods of
    :class:`MultiTaskDataModule`), and list their on-disk splits in ``disk_splits`` and the split
    each stage split reads in ``stage_splits``.

    Args:
        root: the dataset directory.
        tasks, batch_size, eval_batch_size, num_workers: as in :class:`MultiTaskDataModule`.
        on_bad_samples: what ``setup()`` does when the quick check finds bad samples: ``error``
            stops with their list; ``skip`` leaves them out and logs which.
        kwargs: further options of :class:`MultiTaskDataModule` (``predict_dir``, ``predict_size``).
    """

    disk_splits: ClassVar[tuple[str, ...]] = ("train", "val")
    stage_splits: ClassVar[dict[str, str]] = {"train": "train", "val": "val", "test": "val", "predict": "val"}

    def __init__(
        self,
        root: str | Path,
        tasks: Sequence[str] | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_bad_samples: Literal["error", "skip"] = "error",
        **kwargs: Any,
    ) -> None:
        if on_bad_samples not in ("error", "skip"):
            raise ValueError(f"on_bad_samples must be 'error' or 'skip', got {on_bad_samples!r}")
        self.root = Path(root).expanduser()
        self.on_bad_samples = on_bad_samples
        super().__init__(tasks, batch_size, eval_batch_size, num_workers, **kwargs)

    def build_split(self, split: str, tasks: Sequence[Task]) -> FileDataset:
        """The untransformed dataset of on-disk ``split`` decoding ``tasks``.

        Raises:
            DataFileError: the split cannot be listed (missing split file or folder).
        """
        raise NotImplementedError

    def make_transform(self, split: str) -> Callable[[dict], dict] | None:
        """The transform of stage split ``split`` (``train``, ``val``, ``test``, ``predict``)."""
        raise NotImplementedError

    def layout_notes(self) -> list[str]:
        """Facts about the layout found under ``root``, shown by ``polytask data check``."""
        return []

    def listing_files(self, split: str) -> list[Path]:
        """Files besides the samples' own that define ``split`` (split lists, label tables)."""
        return []

    def preflight(self, stage: str | None) -> list[str]:
        """The splits ``stage`` reads that cannot be listed under ``root`` (see :meth:`MultiTaskDataModule.preflight`)."""
        problems = []
        for split in _STAGE_SPLITS[stage]:
            if split == "predict" and self.predict_dir is not None:
                continue
            disk_split = self.stage_splits[split]
            try:
                self.build_split(disk_split, self.tasks)
            except DataFileError as err:
                problems.append(
                    f"{self.name} split {disk_split!r}: {err.path}: {err.detail} "
                    f"(the dataset root is {self.root}; point --data.init_args.root at the dataset directory)"
                )
        return list(dict.fromkeys(problems))

    def make_dataset(self, split: str) -> FileDataset:
        dataset = self.build_split(self.stage_splits[split], self.tasks)
        dataset.transform = self.make_transform(split)
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` and run the quick check on each (see ``on_bad_samples``).

        With ``predict_dir`` set, the dataset's predict split is neither built nor checked: predict
        runs on that folder's images (:meth:`MultiTaskDataModule.predict_dataloader`).
        """
        for split in _STAGE_SPLITS[stage]:
            if split in self.datasets or (split == "predict" and self.predict_dir is not None):
                continue
            dataset = self.make_dataset(split)
            disk_split = self.stage_splits[split]
            problems = cached_quick_check(self.name, self.root, dataset, disk_split, self.listing_files(disk_split))
            if problems:
                self._bad_samples(dataset, disk_split, problems)
            self.datasets[split] = dataset

    def _bad_samples(self, dataset: FileDataset, split: str, problems: Sequence[Problem]) -> None:
        bad = sorted({p.sample for p in problems})
        listing = "\n".join(f"  {p.sample}: {p.path}: {p.detail}" for p in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        if self.on_bad_samples == "skip":
            dataset.drop(set(bad))
            log.warning(
                "%s split %r: skipping %d bad sample(s) of %d: %s\n%s%s",
                self.name, split, len(bad), len(bad) + len(dataset), ", ".join(bad), listing, more,
            )
            return
        message = (
            f"{self.name} at {self.root}: {len(bad)} bad sample(s) in split {split!r}:\n{listing}{more}\n"
            f"Run `polytask data check --dataset {self.name} --root {self.root}` for the full report, "
            "or set on_bad_samples: skip to train without them."
        )
        raise BrokenDatasetError(message, problems)


def registry() -> dict[str, type[FileDataModule]]:
    """The datamodules ``polytask data check`` knows, by dataset name."""
    from polytask.data.celeba import CelebADataModule
    from polytask.data.folder import FolderDataModule
    from polytask.data.mtan import CityscapesMTANDataModule, NYUv2MTANDataModule
    from polytask.data.nyud import NYUDDataModule
    from polytask.data.pascal_context import PascalContextDataModule

    modules: list[type[FileDataModule]] = [
        PascalContextDataModule,
        NYUDDataModule,
        NYUv2MTANDataModule,
        CityscapesMTANDataModule,
        CelebADataModule,
        FolderDataModule,
    ]
    return {m.name: m for m in modules}


def check_dataset(name: str, root: str | Path, full: bool = True, options: Mapping[str, Any] | None = None) -> CheckReport:
    """Check every split and every task of a dataset directory.

    Args:
        name: dataset name (see :func:`registry`): pascal_context, nyud, nyuv2_mtan,
            cityscapes_mtan, celeba, folder.
        root: the dataset directory.
        full: also decode every target and check its values (else header-level checks only).
        options: further datamodule arguments (e.g. ``{"num_classes": 19}``).

    Returns:
        The report of every problem found (a layout problem ends the walk early).
    """
    modules = registry()
    if name not in modules:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(modules)}")
    report = CheckReport(name, Path(root))
    try:
        module = modules[name](root=root, **dict(options or {}))
    except DataFileError as err:
        report.problems.append(_problem("-", "-", "-", err))
        return report
    report.notes.extend(module.layout_notes())
    for split in module.disk_splits:
        summary = report.splits.setdefault(split, SplitSummary())
        try:
            dataset = module.build_split(split, module.tasks)
        except DataFileError as err:
            report.problems.append(_problem(split, "-", "-", err))
            summary.problems += 1
            continue
        problems = check_split(dataset, split, full)
        report.problems.extend(problems)
        summary.samples = len(dataset)
        summary.bad_samples = len({p.sample for p in problems})
        summary.problems = len(problems)
    return report
