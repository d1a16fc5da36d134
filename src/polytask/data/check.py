"""Dataset validation (``polytask data check``): every problem of every split of a dataset
directory at once (missing split lists and files, unreadable or truncated files, shape mismatches
between the image and its targets and, in a full check, label values outside the class range and
NaNs) with the files involved, plus a per-split summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from polytask.data.io import DataFileError
from polytask.data.problems import Problem, check_split, problem_from_error
from polytask.data.registry import registry


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
        report.problems.append(problem_from_error("-", "-", "-", err))
        return report
    report.notes.extend(module.layout_notes())
    for split in module.disk_splits:
        summary = report.splits.setdefault(split, SplitSummary())
        try:
            dataset = module.build_split(split, module.tasks)
        except DataFileError as err:
            report.problems.append(problem_from_error(split, "-", "-", err))
            summary.problems += 1
            continue
        problems = check_split(dataset, split, full)
        report.problems.extend(problems)
        summary.samples = len(dataset)
        summary.bad_samples = len({p.sample for p in problems})
        summary.problems = len(problems)
    return report
