"""Where a run writes: one folder per run, shared by its loggers, named after its dataset and model.

* **Loggers.** A config that leaves ``trainer.logger`` unset gets a CSV and a TensorBoard logger in
  ``trainer.default_root_dir`` (``runs``).
* **Name.** ``run_name`` when the config sets it (every config in ``configs/`` sets its own, unique
  one), else ``<dataset>_<model>``: the datamodule's ``name`` and the network's name in
  :data:`polytask.models.MODEL_REGISTRY` (``synthscenes_taskexpert``).
* **One version per run.** ``fit`` gives every file logger (CSV, TensorBoard) the same
  ``version_N``: the next one free under all of their ``<save_dir>/<name>`` folders, so a run's
  metrics, events, checkpoints and metric JSON share ``<save_dir>/<name>/version_N``.
* **Evaluation is not a training version.** ``validate`` / ``test`` / ``predict`` write into a
  sub-folder ``<stage>-<checkpoint name>`` of the run that wrote the checkpoint
  (``runs/x/version_3/test-last``) or, for a checkpoint from elsewhere, of ``<save_dir>/<name>``
  (``runs/x/predict-model``, ``runs/x/test-other_run-version_0-last``; ``<stage>-untrained``
  without one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from polytask.training.checkpoint import last_files, newest

FILE_LOGGERS = ("CSVLogger", "TensorBoardLogger")
"""Class names of the Lightning loggers that write into ``<save_dir>/<name>/<version>`` and take a ``version``."""

_VERSION = re.compile(r"^version_(\d+)$")


def registered_name(net_class_path: str) -> str:
    """The :data:`~polytask.models.MODEL_REGISTRY` name of a network class path, else the class name in snake case."""
    from polytask.models import MODEL_REGISTRY

    class_name = net_class_path.rpartition(".")[2]
    for name, cls in MODEL_REGISTRY.items():
        if cls.__name__ == class_name:
            return name
    return re.sub(r"(?<!^)(?=[A-Z])", "_", class_name).lower()


def default_run_name(data_name: str, net_class_path: str) -> str:
    """``<dataset>_<model>``, e.g. ``synthscenes_taskexpert``."""
    return f"{data_name}_{registered_name(net_class_path)}"


def next_version(roots: Sequence[Path]) -> int:
    """The smallest ``N`` above every ``version_N`` folder found in any of ``roots`` (0 when none)."""
    found = [
        int(match.group(1))
        for root in roots if root.is_dir()
        for child in root.iterdir() if child.is_dir() and (match := _VERSION.match(child.name))
    ]
    return max(found, default=-1) + 1


def checkpoint_run(ckpt_path: str | Path) -> Path | None:
    """The run folder of a checkpoint written by training: ``RUN`` for ``RUN/checkpoints/*.ckpt``, else None."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def evaluation_version(stage: str, ckpt_path: str | Path | None, root: Path) -> str:
    """The logger ``version`` (a path below ``root`` = ``<save_dir>/<name>``) of a ``stage`` run.

    Args:
        stage: ``validate``, ``test`` or ``predict``.
        ckpt_path: the weights evaluated (None: untrained).
        root: the loggers' ``<save_dir>/<name>``.
    """
    if ckpt_path is None:
        return f"{stage}-untrained"
    folder = f"{stage}-{Path(ckpt_path).stem}"
    run = checkpoint_run(ckpt_path)
    if run is not None and run.parent.resolve() == root.resolve():
        return f"{run.name}/{folder}"
    if run is not None:
        return f"{stage}-{run.parent.name}-{run.name}-{Path(ckpt_path).stem}"
    return folder


def _get(namespace: Any, key: str, default: Any = None) -> Any:
    if isinstance(namespace, Mapping):
        return namespace.get(key, default)
    return getattr(namespace, key, default)


def _set(namespace: Any, key: str, value: Any) -> None:
    if isinstance(namespace, MutableMapping):
        namespace[key] = value
    else:
        setattr(namespace, key, value)


STANDARD_LOGGERS: dict[str, dict[str, Any]] = {
    "lightning.pytorch.loggers.CSVLogger": {},
    "lightning.pytorch.loggers.TensorBoardLogger": {"default_hp_metric": False},
}
"""The loggers (and their options) of a run whose config leaves ``trainer.logger`` unset: CSV metrics
and TensorBoard (without the placeholder ``hp_metric`` of -1)."""

UNSET_NAMES = (None, "lightning_logs")
"""Logger names that count as unset: none, or Lightning's default."""


def file_loggers(config: Any) -> list[Any]:
    """The ``init_args`` of the CSV / TensorBoard loggers of a resolved command config (``trainer.logger``)."""
    loggers = _get(_get(config, "trainer"), "logger")
    if not isinstance(loggers, (list, tuple)):
        loggers = [loggers]
    return [
        _get(logger, "init_args") for logger in loggers
        if _get(logger, "class_path", "").rpartition(".")[2] in FILE_LOGGERS and _get(logger, "init_args") is not None
    ]


def run_name(config: Any) -> str:
    """The config's ``run_name``, else ``<dataset>_<model>`` of its datamodule and network."""
    name = _get(config, "run_name")
    if name:
        return str(name)
    from polytask.data.registry import datamodule_class

    data, net = _get(config, "data"), _get(_get(_get(config, "model"), "init_args"), "net")
    return default_run_name(datamodule_class(_get(data, "class_path")).name, _get(net, "class_path", "net"))


def assign_run_folder(config: Any, stage: str, ckpt_path: str | None) -> tuple[Path | None, list[Any]]:
    """Give a resolved command config its loggers' names and one common version, in place.

    A config that leaves ``trainer.logger`` unset (``null`` or ``true``) gets the
    :data:`STANDARD_LOGGERS` in ``trainer.default_root_dir``; ``false`` keeps the run without
    loggers. File loggers without a ``name`` get :func:`run_name`, and those without a
    ``version`` one common version (see the module's doc).

    Args:
        config: the command's resolved config (``trainer.logger`` is edited).
        stage: ``fit``, ``validate``, ``test`` or ``predict``.
        ckpt_path: the checkpoint or weights file the command loads (None: none; ``last``: the
            newest ``last.ckpt`` of the runs under the first logger's ``<save_dir>/<name>``).

    Returns:
        The run folder of the first file logger (None when the run has no file logger) and the
        ``init_args`` of the loggers whose version was assigned here.
    """
    trainer = _get(config, "trainer")
    root_dir = str(_get(trainer, "default_root_dir") or ".")
    if _get(trainer, "logger") in (None, True):
        from jsonargparse import Namespace

        _set(trainer, "logger", [
            Namespace(class_path=path, init_args=Namespace(save_dir=root_dir, name=None, version=None, **options))
            for path, options in STANDARD_LOGGERS.items()
        ])
    loggers = file_loggers(config)
    if not loggers:
        return None, []
    for args in loggers:
        if _get(args, "name") in UNSET_NAMES:
            _set(args, "name", run_name(config))
    roots = [Path(_get(args, "save_dir") or root_dir) / str(_get(args, "name")) for args in loggers]
    if stage == "fit":
        version: int | str = next_version(roots)
    else:
        if ckpt_path == "last":
            ckpt_path = newest(sorted(last_files(roots[0]))) or ckpt_path
        version = evaluation_version(stage, ckpt_path, roots[0])
    assigned = [args for args in loggers if _get(args, "version") is None]
    for args in assigned:
        _set(args, "version", version)
    first = _get(loggers[0], "version")
    return roots[0] / (first if isinstance(first, str) else f"version_{first}"), assigned
