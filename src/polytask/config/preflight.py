"""Checks a command runs on its resolved config before it builds anything: the data and the weights.

A paper config on a machine without its dataset or without network access should say so at once,
in a few lines, with the options that fix each problem, instead of failing inside the model's
constructor and, once that is fixed, inside the datamodule's setup.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from polytask.data.io import DataFileError
from polytask.data.registry import build_datamodule
from polytask.models.backbones import OFFLINE_HINT, pretrained_weights_problem


class PreflightError(RuntimeError):
    """A command cannot run: every problem found before building the model and the data."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(["polytask cannot run this config:", *(f"  - {p}" for p in problems)]))


def _plain(value: Any) -> Any:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value or {})


def data_problems(data: Any, stage: str) -> list[str]:
    """What stops the datamodule ``data`` (``{class_path, init_args}``) from serving ``stage``."""
    try:
        datamodule = build_datamodule(data)
    except DataFileError as err:
        return [f"{err.path}: {err.detail} (point --data.init_args.root at the dataset directory)"]
    except Exception:  # noqa: BLE001 - any other error is raised, with its own message, when the CLI builds the datamodule
        return []
    return datamodule.preflight(stage)


def weights_problems(net: Mapping[str, Any]) -> list[str]:
    """What stops the network config ``net`` (``{class_path, init_args}``) from loading its pretrained weights."""
    args = _plain(net.get("init_args"))
    if not args.get("pretrained") or args.get("pretrained_file") or not isinstance(args.get("backbone"), str):
        return []
    problem = pretrained_weights_problem(args["backbone"])
    return [] if problem is None else [f"{problem}. {OFFLINE_HINT}"]


def preflight(config: Mapping[str, Any], stage: str) -> None:
    """Check the data and the pretrained weights of a resolved command config (``fit``, ``validate``, ...).

    Raises:
        PreflightError: every problem found, each with the option that fixes it.
    """
    problems = []
    model = _plain(config.get("model"))
    net = model.get("init_args", {}).get("net") if "init_args" in model else model.get("net")
    if isinstance(net, Mapping):
        problems += weights_problems(net)
    if config.get("data"):
        problems += data_problems(config["data"], stage)
    if problems:
        raise PreflightError(problems)
