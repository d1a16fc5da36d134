"""Config layering: polytask's default configs and where they go on a command line.

``default.yaml`` (trainer, data and module defaults, no network) is layered under every command's
own configs; ``main_job.yaml`` (the main job's network) is added only when nothing the user gave
names a network.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = str(resources.files("polytask") / "default.yaml")
MAIN_JOB_CONFIG = str(resources.files("polytask") / "main_job.yaml")
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


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
