"""The ``polytask`` command: Lightning's fit/validate/test/predict plus polytask's own tools."""

from __future__ import annotations

import difflib
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from polytask.data.datamodule import MultiTaskDataModule
from polytask.preflight import PreflightError, preflight
from polytask.training.checkpoint import describe_last_search, last_checkpoints
from polytask.training.model_summary import with_net_flops
from polytask.training.module import MultiTaskModule

DEFAULT_CONFIG = str(resources.files("polytask") / "default.yaml")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# polytask passes the arguments it built (defaults first) while sys.argv holds the user's own
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")


class PolytaskCLI(LightningCLI):
    """LightningCLI whose model receives the datamodule's tasks and default loss weights, and whose
    ``--ckpt_path last`` stops when there is no last checkpoint (unless ``--allow_missing_last true``)."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, its model summary replaced by one that counts the network's FLOPs."""
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks[:] = [with_net_flops(callback) for callback in trainer.callbacks]
        return trainer

    def before_instantiate_classes(self) -> None:
        """Check the data and the pretrained weights of the command's config before building them."""
        if self.subcommand is not None:
            preflight(self.config[self.subcommand], self.subcommand)

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

    def before_fit(self) -> None:
        """Refuse ``--ckpt_path last`` without a last checkpoint (:meth:`check_last_checkpoint`)."""
        self.check_last_checkpoint("fit")

    def before_validate(self) -> None:
        """Refuse ``--ckpt_path last`` without a last checkpoint (:meth:`check_last_checkpoint`)."""
        self.check_last_checkpoint("validate")

    def before_test(self) -> None:
        """Refuse ``--ckpt_path last`` without a last checkpoint (:meth:`check_last_checkpoint`)."""
        self.check_last_checkpoint("test")

    def before_predict(self) -> None:
        """Refuse ``--ckpt_path last`` without a last checkpoint (:meth:`check_last_checkpoint`)."""
        self.check_last_checkpoint("predict")

    def check_last_checkpoint(self, subcommand: str) -> None:
        """With ``--ckpt_path last``, make sure there is a last checkpoint to load.

        Lightning only warns when ``ckpt_path="last"`` finds nothing and then trains from scratch
        (or evaluates untrained weights). Here that is an error, unless ``--allow_missing_last
        true``: then ``ckpt_path`` is dropped with a warning.

        Raises:
            FileNotFoundError: no last checkpoint, naming where the checkpoint callbacks looked.
        """
        config = self.config[subcommand]
        if config.get("ckpt_path") != "last" or last_checkpoints(self.trainer):
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


def with_defaults(args: Sequence[str]) -> list[str]:
    """Insert polytask's default config right after the subcommand, so later configs override it."""
    args = list(args)
    if args and args[0] in LIGHTNING_COMMANDS:
        return [args[0], "--config", DEFAULT_CONFIG, *args[1:]]
    return args


def lightning_main(args: Sequence[str]) -> PolytaskCLI:
    """Run a Lightning subcommand with polytask's defaults (hard sharing on SynthScenes)."""
    return PolytaskCLI(
        MultiTaskModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=with_defaults(args),
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
    args = [a for path in (DEFAULT_CONFIG, *config_paths) for a in ("--config", str(path))] + list(overrides)
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
    return 0
