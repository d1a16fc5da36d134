"""The ``polytask`` command: Lightning's fit/validate/test/predict plus polytask's own tools."""

from __future__ import annotations

import argparse
import difflib
import sys
import warnings
from collections.abc import Callable, Sequence
from functools import partialmethod
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from polytask.data.datamodule import MultiTaskDataModule
from polytask.preflight import PreflightError, preflight
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
from polytask.training.standard_callbacks import add_prediction_writer, add_standard_callbacks

DEFAULT_CONFIG = str(resources.files("polytask") / "default.yaml")
MAIN_JOB_CONFIG = str(resources.files("polytask") / "main_job.yaml")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# polytask passes the arguments it built (defaults first) while sys.argv holds the user's own
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")


class PolytaskCLI(LightningCLI):
    """LightningCLI whose model receives the datamodule's tasks and default loss weights.

    Before building anything it checks the data and the weights (:func:`polytask.preflight.preflight`)
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


def _names_network(config: Any) -> bool:
    """Whether a parsed YAML config sets the network's class (``model.net`` or ``model.init_args.net``)."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return False
    for holder in (model, model.get("init_args")):
        net = holder.get("net") if isinstance(holder, dict) else None
        if isinstance(net, str) or (isinstance(net, dict) and "class_path" in net):
            return True
    return False


_NET_CLASS_OPTIONS = ("--model.net", "--model.init_args.net", "--model.net.class_path", "--model.init_args.net.class_path")


def default_configs(args: Sequence[str]) -> list[str]:
    """The configs layered under a command's own: ``default.yaml``, then ``main_job.yaml`` when neither
    a ``--config`` file nor a ``--model...net`` class option names a network.
    """
    args = list(args)
    names = False
    for i, arg in enumerate(args):
        option, _, value = arg.partition("=")
        if option in ("--config", "-c"):
            path = Path(value or (args[i + 1] if i + 1 < len(args) else ""))
            if path.is_file():  # a missing file is reported by the config parser
                try:
                    names = names or _names_network(yaml.safe_load(path.read_text()))
                except yaml.YAMLError:  # reported by the config parser, with its position
                    pass
        elif option in _NET_CLASS_OPTIONS:
            names = True
    return [DEFAULT_CONFIG] if names else [DEFAULT_CONFIG, MAIN_JOB_CONFIG]


def with_defaults(args: Sequence[str]) -> list[str]:
    """Insert polytask's default configs (:func:`default_configs`) right after the subcommand, so
    later configs override them (and, for validate/test, ``--verbose false``: the metric table is
    MetricReport's)."""
    args = list(args)
    if args and args[0] in LIGHTNING_COMMANDS:
        defaults = [a for path in default_configs(args[1:]) for a in ("--config", path)]
        if args[0] in ("validate", "test"):  # MetricReport prints the metric table; Lightning's own repeats it
            defaults += ["--verbose", "false"]
        return [args[0], *defaults, *args[1:]]
    return args


def lightning_main(args: Sequence[str]) -> PolytaskCLI:
    """Run a Lightning subcommand with polytask's defaults (hard sharing on SynthScenes)."""
    return PolytaskCLI(
        MultiTaskModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=with_defaults(args),
        save_config_callback=LoggedConfigCallback,
        save_config_kwargs={"overwrite": True},
    )


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


def parse_tool_args(parser: argparse.ArgumentParser, args: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse a tool's own options; every other argument is a config override, as on the ``fit``
    command line (``--model.init_args.net.init_args.width 64``). Arguments after a ``--``
    separator are overrides even when they look like one of the tool's options.

    Returns:
        The tool's options and the overrides, in order.
    """
    args = list(args)
    split = args.index("--") if "--" in args else len(args)
    options, unknown = parser.parse_known_args(args[:split])
    return options, [*unknown, *args[split + 1 :]]


def data_tool(args: Sequence[str]) -> int:
    """``polytask data check --dataset NAME --root DIR``: validate a dataset directory."""
    from polytask.data.check import data_main

    return data_main(args)


def export_tool(args: Sequence[str]) -> int:
    """``polytask export --ckpt CKPT --out W.safetensors``: export model weights as safetensors."""
    from polytask.training.checkpoint import export_main

    return export_main(args)


def evaluate_tool(args: Sequence[str]) -> int:
    """``polytask evaluate --dataset NAME --root DATA --pred-dir PRED``: score prediction files."""
    from polytask.evaluation.evaluate import evaluate_main

    return evaluate_main(args)


def summary_tool(args: Sequence[str]) -> int:
    """``polytask summary --config CFG``: parameters per component and FLOPs at the training resolution."""
    from polytask.summary_cli import summary_main

    return summary_main(args)


def experts_tool(args: Sequence[str]) -> int:
    """``polytask experts --config CFG --image IMG``: TaskExpert's dominant-expert maps."""
    from polytask.diagnostics.expert_usage import expert_usage_main

    return expert_usage_main(args)


def bench_tool(args: Sequence[str]) -> int:
    """``polytask bench --config CFG``: step time, memory, FLOPs and the ratios of one run."""
    from polytask.bench import bench_main

    return bench_main(args)


def study_tool(args: Sequence[str]) -> int:
    """``polytask study run STUDY.yaml`` / ``polytask study report DIR``: paired multi-seed comparisons."""
    from polytask.study.cli import study_main

    return study_main(args)


TOOLS: dict[str, Callable[[Sequence[str]], int]] = {
    "bench": bench_tool,
    "data": data_tool,
    "evaluate": evaluate_tool,
    "experts": experts_tool,
    "export": export_tool,
    "study": study_tool,
    "summary": summary_tool,
}


LIGHTNING_SUMMARIES: dict[str, str] = {
    "fit": "train a model (no arguments: the main job, on the embedded SynthScenes data)",
    "validate": "score weights on the validation split",
    "test": "score weights on the test split",
    "predict": "write predictions for a split or a folder of images",
}


def command_summaries() -> dict[str, str]:
    """Every ``polytask`` command with its one-line summary (Lightning's, then the tools')."""
    tools = {name: (tool.__doc__ or "").split(": ", 1)[-1].strip().rstrip(".") for name, tool in TOOLS.items()}
    return {**LIGHTNING_SUMMARIES, **tools}


def usage() -> str:
    """The top-level help: every command, one line each."""
    summaries = command_summaries()
    width = max(map(len, summaries))
    lines = [
        "polytask: multi-task scene understanding (TaskExpert, ETR-NLP and their baselines)",
        "",
        "usage: polytask COMMAND [options]",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, summary in summaries.items()),
        "",
        "polytask COMMAND --help lists a command's options; fit/validate/test/predict take --config FILE",
        "and any config key as --key value (polytask fit --print_config shows the resolved config).",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polytask`` console command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] in TOOLS:
        return TOOLS[args[0]](args[1:])
    if not args[0].startswith("-") and args[0] not in LIGHTNING_COMMANDS:
        close = difflib.get_close_matches(args[0], list(command_summaries()), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"polytask: unknown command '{args[0]}'{hint} (polytask --help lists them)", file=sys.stderr)
        return 2
    try:
        lightning_main(args)
    except PreflightError as err:
        print(err, file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"polytask {args[0]}: error: {err}", file=sys.stderr)
        return 2
    return 0
