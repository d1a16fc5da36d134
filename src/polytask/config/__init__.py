"""Building runs from configs: the default layering, polytask's LightningCLI and the checks it runs
before building anything (data splits, pretrained weights)."""

from polytask.config.layering import DEFAULT_CONFIG, LIGHTNING_COMMANDS, MAIN_JOB_CONFIG, default_configs, with_defaults
from polytask.config.lightning_cli import PolytaskCLI, config_cli, instantiate, lightning_main
from polytask.config.preflight import PreflightError, preflight

__all__ = [
    "DEFAULT_CONFIG",
    "LIGHTNING_COMMANDS",
    "MAIN_JOB_CONFIG",
    "PolytaskCLI",
    "PreflightError",
    "config_cli",
    "default_configs",
    "instantiate",
    "lightning_main",
    "preflight",
    "with_defaults",
]
