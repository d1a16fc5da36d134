"""Arguments shared by polytask's tools: their own options, and config overrides as for ``fit``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


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
