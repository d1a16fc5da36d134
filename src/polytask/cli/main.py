"""The ``polytask`` command: Lightning's fit/validate/test/predict plus polytask's own tools.

Nothing imports this package: each tool is a thin module here over the library (``polytask data``
over :mod:`polytask.data.check`, ``polytask bench`` over :mod:`polytask.profiling`, ...), loaded
only when its command runs.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

from polytask.config import LIGHTNING_COMMANDS, PreflightError, lightning_main
from polytask.training.checkpoint import CheckpointError
from polytask.utils.host_memory import keep_freed_memory

TOOLS: dict[str, str] = {
    "bench": "step time, memory, FLOPs and the ratios of one run",
    "data": "validate a dataset directory (polytask data check --dataset NAME --root DIR)",
    "evaluate": "score saved prediction files against a dataset's ground truth",
    "experts": "TaskExpert's dominant-expert maps of one image",
    "export": "a checkpoint's network weights as a safetensors file",
    "study": "paired multi-seed comparisons (polytask study run STUDY.yaml / report DIR)",
    "summary": "parameters per component and FLOPs at the training resolution",
}
"""Each tool's module, ``polytask.cli.<name>``, with its one-line summary."""


def run_tool(name: str, args: Sequence[str]) -> int:
    """Run ``polytask <name> ARGS`` through its module's ``main``."""
    return importlib.import_module(f"polytask.cli.{name}").main(args)


LIGHTNING_SUMMARIES: dict[str, str] = {
    "fit": "train a model (no arguments: the main job, on the embedded SynthScenes data)",
    "validate": "score weights on the validation split",
    "test": "score weights on the test split",
    "predict": "write predictions for a split or a folder of images",
}


def command_summaries() -> dict[str, str]:
    """Every ``polytask`` command with its one-line summary (Lightning's, then the tools')."""
    return {**LIGHTNING_SUMMARIES, **TOOLS}


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
    try:
        keep_freed_memory()
    except ValueError as err:
        print(f"polytask: {err}", file=sys.stderr)
        return 2
    if args[0] in TOOLS:
        return run_tool(args[0], args[1:])
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
