"""Evaluation protocols a dataset declares (class attributes of its datamodule), so that the
evaluation layer asks the datamodule instead of knowing datasets by name.

Only what the published protocol fixes for the dataset is declared here; how it is applied
lives in :mod:`polytask.evaluation` (which imports this module; this module imports nothing of it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


def id_list_sha256(ids: Sequence[str]) -> str:
    """SHA-256 of the sorted unique ids, one per line with a final newline."""
    return hashlib.sha256(("\n".join(sorted(set(ids))) + "\n").encode()).hexdigest()


@dataclass(frozen=True)
class PublishedIdList:
    """A published list of sample ids, recognised by its hash so that it need not be shipped.

    Attributes:
        sha256: :func:`id_list_sha256` of the list.
        size: the number of ids it holds.
        path: where the list is published (the file the user passes, e.g. to ``--boundary-ids``).
        dataset_title: the dataset's name in messages (``PASCAL-Context``).
    """

    sha256: str
    size: int
    path: str
    dataset_title: str

    def matches(self, ids: Sequence[str]) -> bool:
        """Whether ``ids`` (in any order, repeats ignored) are this list."""
        return id_list_sha256(ids) == self.sha256


@dataclass(frozen=True)
class BoundaryProtocol:
    """How the published results of a dataset score boundaries with SEISM (odsF / oisF / AP).

    A datamodule declares it as its ``boundary_protocol``; a dataset without one has its
    boundaries scored by the training monitor F_tol only.

    Attributes:
        max_dist: SEISM's matching tolerance, as a fraction of the image diagonal.
        ground_truth: what SEISM's boundary ground truth is made from, for reports (e.g.
            ``seg2bmap(LabelMap)``): the boundaries of the label map the split's
            :meth:`~polytask.data.io.FileDataset.seism_label_map` gives.
        test_new: SEISM's ``test_new`` subset of the val split, the subset the published
            numbers are scored on; None: ``test_new`` holds every val image.
    """

    max_dist: float
    ground_truth: str
    test_new: PublishedIdList | None = None
