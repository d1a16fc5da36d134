"""The reporting callbacks every polytask command has, whatever callbacks its config lists.

A ``trainer.callbacks`` list in a YAML config replaces the list of the configs before it, so a
config that only wants another checkpoint frequency would otherwise lose the metric table or the
TensorBoard images. :func:`add_standard_callbacks` appends each standard callback that the
resolved config does not list already (a config that lists one sets its options); the learning
rate monitor only when the run has a logger. :func:`add_prediction_writer` does the same for
``polytask predict``, which writes its predictions to files by default.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from jsonargparse import Namespace

STANDARD_CALLBACKS: tuple[str, ...] = (
    "polytask.training.MetricReport",
    "polytask.training.ValidationImages",
    "polytask.diagnostics.ExpertUsageMonitor",
)
"""Class paths of the callbacks every run gets: the metric table and JSON, validation images in
TensorBoard, expert usage of mixture-of-experts networks (nothing for other networks)."""

LOGGER_CALLBACKS: tuple[str, ...] = ("lightning.pytorch.callbacks.LearningRateMonitor",)
"""Class paths of the standard callbacks that need a logger."""


def _class_name(entry: Any) -> str:
    class_path = entry.get("class_path", "") if isinstance(entry, (MutableMapping, Namespace)) else type(entry).__qualname__
    return str(class_path).rpartition(".")[2]


def add_standard_callbacks(trainer: MutableMapping[str, Any] | Namespace) -> list[str]:
    """Append to a resolved ``trainer`` config the standard callbacks its ``callbacks`` lack, in place.

    Args:
        trainer: the ``trainer`` entry of a command's resolved config.

    Returns:
        The class paths added.
    """
    callbacks = trainer.get("callbacks")
    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    present = {_class_name(entry) for entry in callbacks}
    logger = trainer.get("logger")
    has_logger = bool(logger) and logger != []
    wanted = STANDARD_CALLBACKS + (LOGGER_CALLBACKS if has_logger else ())
    added = [path for path in wanted if path.rpartition(".")[2] not in present]
    callbacks += [Namespace(class_path=path, init_args=Namespace()) for path in added]
    trainer["callbacks"] = callbacks
    return added


PREDICTION_WRITER = "polytask.training.PredictionWriter"


def add_prediction_writer(trainer: MutableMapping[str, Any] | Namespace, out_dir: str) -> bool:
    """Append a :class:`~polytask.training.PredictionWriter` into ``out_dir`` unless ``callbacks`` lists one.

    Returns:
        Whether it was added.
    """
    callbacks = list(trainer.get("callbacks") or [])
    if any(_class_name(entry) == PREDICTION_WRITER.rpartition(".")[2] for entry in callbacks):
        return False
    trainer["callbacks"] = [*callbacks, Namespace(class_path=PREDICTION_WRITER, init_args=Namespace(out_dir=out_dir))]
    return True


INTERFERENCE = "polytask.diagnostics.TaskInterference"


def add_interference_callback(trainer: MutableMapping[str, Any] | Namespace, every_n_steps: int) -> None:
    """Append a :class:`~polytask.diagnostics.TaskInterference` measuring every ``every_n_steps`` steps
    (``--interference N``), or set that option of the one ``callbacks`` lists already."""
    if every_n_steps < 0:
        raise ValueError(f"--interference takes a number of steps >= 0 (0: off), got {every_n_steps}")
    callbacks = list(trainer.get("callbacks") or [])
    for entry in callbacks:
        if _class_name(entry) == INTERFERENCE.rpartition(".")[2] and isinstance(entry, (MutableMapping, Namespace)):
            entry["init_args"] = Namespace(**{**dict(entry.get("init_args") or {}), "every_n_steps": every_n_steps})
            return
    trainer["callbacks"] = [*callbacks, Namespace(class_path=INTERFERENCE, init_args=Namespace(every_n_steps=every_n_steps))]
