"""The resolved config of a run, saved as ``config.yaml`` and logged as the loggers' hyperparameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback

LOGGED_PREFIXES: tuple[str, ...] = ("model.", "data.", "seed_everything", "run_name", "weights", "ckpt_path")
"""Config keys (dotted, or their prefixes) logged as hyperparameters."""

LOGGED_TRAINER_KEYS: tuple[str, ...] = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.precision", "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
)
"""The trainer settings that change results, logged beside the model and data."""


def hyperparameters(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a flattened config (``{"model.init_args.net.init_args.width": 64, ...}``).

    Keeps the model, data and result-changing trainer keys; ``init_args.`` is dropped from the
    names, and every value that is not a number, string or bool becomes its string.
    """
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if not (key.startswith(LOGGED_PREFIXES) or key in LOGGED_TRAINER_KEYS) or value is None:
            continue
        if key.endswith((".tasks", ".default_loss_weights")) and not isinstance(value, (str, int, float, bool)):
            value = [getattr(v, "name", v) for v in value] if isinstance(value, (list, tuple)) else value
        name = key.replace("init_args.", "")
        out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class LoggedConfigCallback(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` (``config.yaml`` in the run folder) that also gives every
    logger the run's hyperparameters (:func:`hyperparameters`): TensorBoard's HPARAMS tab, the
    CSV logger's ``hparams.yaml``. Runs on global rank 0 only, like the file it saves."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        params = hyperparameters(dict(self.config.clone().as_flat().__dict__))
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
