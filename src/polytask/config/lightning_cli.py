"""polytask's LightningCLI: the datamodule's tasks linked into the model, checks before building,
run folders, ``--weights`` and a strict ``--ckpt_path last``; and building a config without running."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partialmethod
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from polytask.config.layering import default_configs, with_defaults
from polytask.config.preflight import preflight
from polytask.data.datamodule import MultiTaskDataModule
from polytask.training.checkpoint import (
    CheckpointError,
    checkpoint_config,
    describe_last_search,
    file_kind,
    last_checkpoints,
    load_weights,
    newest,
    read_checkpoint,
)
from polytask.training.logged_config import LoggedConfigCallback
from polytask.training.model_summary import with_net_flops
from polytask.training.module import MultiTaskModule
from polytask.training.run_folder import assign_run_folder
from polytask.training.standard_callbacks import add_interference_callback, add_prediction_writer, add_standard_callbacks

# polytask passes the arguments it built (defaults first) while sys.argv holds the user's own
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")


class PolytaskCLI(LightningCLI):
    """LightningCLI whose model receives the datamodule's tasks and default loss weights.

    Before building anything it checks the data and the weights (:func:`polytask.config.preflight.preflight`)
    and names the run's folder (:func:`polytask.training.run_folder.assign_run_folder`). Before
    running it loads ``--weights`` and stops when ``--ckpt_path last`` has nothing to load, or finds
    the last checkpoint of another model config (unless ``--allow_missing_last true``).
    """

    run_folder: Path | None = None
    """Where the command's loggers, metric files and predictions go (None without a file logger)."""
    _assigned_versions: Sequence[Any] = ()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, its model summary replaced by one that counts the network's FLOPs."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks[:] = [with_net_flops(callback) for callback in trainer.callbacks]
        return trainer

    def before_instantiate_classes(self) -> None:
        """Check the data and the pretrained weights, route a weights-only ``--ckpt_path`` to
        ``--weights``, and name the run's folder, all before building anything."""
        if self.subcommand is None:
            return
        config = self.config[self.subcommand]
        preflight(config, self.subcommand)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path not in (None, "last", "best") and Path(ckpt_path).is_file() and file_kind(ckpt_path) == "safetensors":
            if self.subcommand == "fit":
                raise CheckpointError(
                    f"--ckpt_path {ckpt_path}: a safetensors file holds network weights only, no optimizer state or "
                    f"training position, so fit cannot resume from it; start training from these weights with "
                    f"--weights {ckpt_path}"
                )
            config["weights"], config["ckpt_path"] = ckpt_path, None
        if config.get("weights") is not None and config.get("ckpt_path") is not None:
            raise ValueError(
                f"give --weights ({config['weights']}) or --ckpt_path ({config['ckpt_path']}), not both: a checkpoint "
                "restores the network weights itself"
            )
        named = config.get("weights") or config.get("ckpt_path")
        self.run_folder, self._assigned_versions = assign_run_folder(config, self.subcommand, named)
        add_standard_callbacks(config["trainer"])
        if self.subcommand == "fit" and config.get("interference"):
            add_interference_callback(config["trainer"], config["interference"])
        if self.subcommand == "predict":
            folder = self.run_folder or Path(config["trainer"]["default_root_dir"])
            add_prediction_writer(config["trainer"], str(folder / "predictions"))

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.link_arguments("data", "model.init_args.tasks", compute_fn=lambda dm: dm.tasks, apply_on="instantiate")
        parser.link_arguments(
            "data", "model.init_args.default_loss_weights", compute_fn=lambda dm: dm.loss_weights, apply_on="instantiate"
        )
        parser.add_argument(
            "--allow_missing_last",
            type=bool,
            default=False,
            help="With --ckpt_path last: when no last checkpoint exists, go on without one (fit: train from scratch) "
            "with a warning instead of stopping with an error.",
        )
        parser.add_argument(
            "--run_name",
            type=Optional[str],
            default=None,
            help="Name of the run's folder, <default_root_dir>/<run_name>/version_N (default: <dataset>_<model>, "
            "e.g. synthscenes_taskexpert; every config in configs/ sets its own).",
        )
        parser.add_argument(
            "--interference",
            type=int,
            default=0,
            help="fit: every N training steps, measure how the tasks' gradients on the shared parameters agree "
            "(cosines, norm ratios; logged, and a heatmap in <run folder>/interference/ at the end); 0: off "
            "(polytask.diagnostics.TaskInterference; docs/weighting.md).",
        )
        parser.add_argument(
            "--weights",
            type=Optional[str],
            default=None,
            help="Network weights to start from: a .safetensors file of `polytask export` or a .ckpt of `polytask fit` "
            "(weights only: fit starts a new run from them; validate/test/predict also take a .safetensors as --ckpt_path).",
        )

    def prepare_run(self, subcommand: str) -> None:
        """Load ``--weights`` and check ``--ckpt_path last`` (:meth:`check_last_checkpoint`)."""
        config = self.config[subcommand]
        for logger_args in self._assigned_versions:
            logger_args["version"] = None  # the saved config.yaml leaves the version to the next run
        if config.get("weights") is not None:
            load_weights(self.model, config["weights"])
        self.check_last_checkpoint(subcommand)

    before_fit = partialmethod(prepare_run, "fit")
    before_validate = partialmethod(prepare_run, "validate")
    before_test = partialmethod(prepare_run, "test")
    before_predict = partialmethod(prepare_run, "predict")

    def check_last_checkpoint(self, subcommand: str) -> None:
        """With ``--ckpt_path last``, make sure there is a last checkpoint of this model config to load.

        Lightning only warns when ``ckpt_path="last"`` finds nothing and then trains from scratch
        (or evaluates untrained weights). Here that is an error, unless ``--allow_missing_last
        true``: then ``ckpt_path`` is dropped with a warning. The checkpoint Lightning would pick
        (the newest) must record the same model config as the command's, so that ``last`` never
        loads the weights of another experiment that logs under the same name.

        Raises:
            FileNotFoundError: no last checkpoint, naming where the checkpoint callbacks looked.
            CheckpointError: the last checkpoint was written by another model config.
        """
        config = self.config[subcommand]
        if config.get("ckpt_path") != "last":
            return
        found = last_checkpoints(self.trainer)
        if found:
            chosen = newest(found)
            recorded = checkpoint_config(read_checkpoint(chosen, mmap=True))
            if recorded is not None and recorded != self.model.config_json:
                raise CheckpointError(
                    f"polytask {subcommand} --ckpt_path last: the newest last checkpoint, {chosen}, was written by another "
                    f"model config, so it is not this experiment's.\n  its config:  {recorded}\n  this config: "
                    f"{self.model.config_json}\nGive the checkpoint file with --ckpt_path to load it anyway (its tensors "
                    "must fit), or give this experiment's runs their own logger name (--trainer.logger.init_args.name)."
                )
            return
        where = describe_last_search(self.trainer)
        if not config.get("allow_missing_last"):
            raise FileNotFoundError(
                f"polytask {subcommand} --ckpt_path last: there is no last checkpoint to load ({where}). "
                "Leave out --ckpt_path to start a new run, give the checkpoint file, or add "
                "--allow_missing_last true to go on without a checkpoint when there is none."
            )
        rank_zero_warn(f"--ckpt_path last: no last checkpoint ({where}); going on without one (--allow_missing_last true)")
        self.config_init[subcommand]["ckpt_path"] = None


def lightning_main(args: Sequence[str]) -> PolytaskCLI:
    """Run a Lightning subcommand with polytask's defaults (hard sharing on SynthScenes).

    A distributed run's process group is destroyed when the subcommand has finished: left to the
    interpreter's exit, its gloo threads were once seen to abort a process ("terminate called
    without an active exception") after a successful run.
    """
    cli = PolytaskCLI(
        MultiTaskModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=with_defaults(args),
        save_config_callback=LoggedConfigCallback,
        save_config_kwargs={"overwrite": True},
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return cli


def config_cli(
    cli_class: type[PolytaskCLI], config_paths: Sequence[str] = (), overrides: Sequence[str] = ()
) -> PolytaskCLI:
    """Parse configs over polytask's defaults with ``cli_class``, running no subcommand.

    Args:
        cli_class: :class:`PolytaskCLI`, or a subclass (e.g. one that stops after parsing).
        config_paths: YAML configs applied in order over the defaults.
        overrides: further ``--key value`` arguments, as on the command line.

    Returns:
        The ``cli_class`` object, its ``.config`` parsed (and whatever ``cli_class`` instantiates).
    """
    own = [a for path in config_paths for a in ("--config", str(path))] + list(overrides)
    args = [a for path in default_configs(own) for a in ("--config", path)] + own
    return cli_class(
        MultiTaskModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
        save_config_callback=None,
    )


def instantiate(config_paths: Sequence[str] = (), overrides: Sequence[str] = ()) -> PolytaskCLI:
    """Build the datamodule, module and trainer of a config without running anything.

    Args:
        config_paths: YAML configs applied in order over the defaults.
        overrides: further ``--key value`` arguments, as on the command line.

    Returns:
        The CLI object: ``.datamodule``, ``.model`` (a :class:`MultiTaskModule`) and ``.trainer``.
    """
    return config_cli(PolytaskCLI, config_paths, overrides)
