"""A study file: arms (configs plus overrides) trained over several seeds, one arm the reference.

A study is a YAML file::

    name: taskexpert_claims            # the study's folder name under the output root
    seeds: [0, 1, 2, 3, 4]
    reference: static                   # Delta_m of every arm is taken against this arm, seed by seed
    split: test                         # the split the final weights are scored on (val or test)
    common:                             # applied to every arm, before the arm's own configs
      configs: [configs/taskexpert_synthscenes.yaml]
      overrides: {trainer.max_steps: 1000, trainer.val_check_interval: 100}
    arms:
      full: {}
      static:
        configs: [configs/taskexpert_static_synthscenes.yaml]
        overrides: {model.net.init_args.num_experts: 1}
    directions:                         # optional: the metrics that enter Delta_m (default: each task's own)
      semseg: {mIoU: true}

Config paths are resolved against the current directory, then against the study file's folder.
Overrides are ``key: value`` pairs written as ``--key=value`` after the configs (a list or mapping
value as JSON), so they take precedence over every config.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SPLITS = ("val", "test")


class StudyError(ValueError):
    """A study file that cannot be run as written; the message names the file and the field."""


@dataclass(frozen=True)
class Arm:
    """One arm: configs applied in order over polytask's defaults, then overrides.

    Attributes:
        name: the arm's name (a folder name).
        configs: YAML config paths, as given in the study file.
        overrides: ``--key=value`` command-line arguments.
    """

    name: str
    configs: tuple[str, ...]
    overrides: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """Plain description (what a run folder records to detect a changed arm)."""
        return {"configs": list(self.configs), "overrides": list(self.overrides)}


@dataclass(frozen=True)
class Study:
    """A parsed study file.

    Attributes:
        name: the study's name.
        arms: arms by name, in file order.
        seeds: the seeds every arm is trained with.
        reference: name of the reference arm of Delta_m.
        split: split the final weights are scored on.
        directions: ``{task: {metric: higher_is_better}}`` of Delta_m, or None for each task's own.
        source: the study file.
    """

    name: str
    arms: dict[str, Arm]
    seeds: tuple[int, ...]
    reference: str
    split: str = "test"
    directions: dict[str, dict[str, bool]] | None = None
    source: Path = field(default=Path("study.yaml"))

    def as_dict(self) -> dict[str, Any]:
        """The study as plain data: what ``polytask study report`` reads back from a study folder."""
        return {
            "name": self.name,
            "seeds": list(self.seeds),
            "reference": self.reference,
            "split": self.split,
            "directions": self.directions,
            "arms": {name: arm.as_dict() for name, arm in self.arms.items()},
        }


def _override_args(overrides: Any, where: str) -> list[str]:
    """``{key: value}`` (or a list of ``--key=value`` strings) -> ``["--key=value", ...]``."""
    if overrides is None:
        return []
    if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides):
        return [o if o.startswith("--") else f"--{o}" for o in overrides]
    if not isinstance(overrides, Mapping):
        raise StudyError(f"{where}: overrides must be a mapping {{key: value}} or a list of '--key=value' strings")
    args = []
    for key, value in overrides.items():
        if isinstance(value, bool) or value is None:
            text = json.dumps(value)
        elif isinstance(value, (list, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        args.append(f"--{key}={text}")
    return args


def _config_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise StudyError(f"{where}: configs must be a path or a list of paths")


def resolve_config(path: str, study_file: Path) -> Path:
    """A config path of a study file: as given if it exists from the current directory, else
    relative to the study file's folder.

    Raises:
        StudyError: neither exists; the message names both places.
    """
    given = Path(path)
    if given.is_file():
        return given
    beside = study_file.parent / path
    if beside.is_file():
        return beside
    raise StudyError(f"{study_file}: config {path!r} not found (looked in {Path.cwd()} and {study_file.parent})")


def _directions(value: Any, where: str) -> dict[str, dict[str, bool]] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise StudyError(f"{where}: directions must map task -> {{metric: true|false}} (true: higher is better)")
    out: dict[str, dict[str, bool]] = {}
    for task, metrics in value.items():
        if not isinstance(metrics, Mapping) or not metrics or not all(isinstance(v, bool) for v in metrics.values()):
            raise StudyError(f"{where}: directions of task {task!r} must map metric -> true|false")
        out[str(task)] = {str(m): bool(v) for m, v in metrics.items()}
    return out


def parse_study(data: Mapping[str, Any], source: Path) -> Study:
    """Validate a study's plain data (as loaded from YAML) and return the :class:`Study`.

    Raises:
        StudyError: a missing or malformed field; the message names the file and the field.
    """
    where = str(source)
    if not isinstance(data, Mapping):
        raise StudyError(f"{where}: a study file must be a YAML mapping")
    unknown = set(data) - {"name", "seeds", "reference", "split", "common", "arms", "directions"}
    if unknown:
        raise StudyError(f"{where}: unknown field(s) {sorted(unknown)}")
    name = data.get("name") or source.stem
    if not isinstance(name, str) or "/" in name:
        raise StudyError(f"{where}: name must be a folder name, got {name!r}")
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise StudyError(f"{where}: seeds must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{where}: seeds must be distinct, got {seeds}")
    split = data.get("split", "test")
    if split not in SPLITS:
        raise StudyError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    common = data.get("common") or {}
    if not isinstance(common, Mapping) or set(common) - {"configs", "overrides"}:
        raise StudyError(f"{where}: common may hold only configs and overrides")
    common_configs = _config_list(common.get("configs"), f"{where}: common")
    common_overrides = _override_args(common.get("overrides"), f"{where}: common")
    arms_data = data.get("arms")
    if not isinstance(arms_data, Mapping) or not arms_data:
        raise StudyError(f"{where}: arms must map arm names to {{configs, overrides}}")
    arms: dict[str, Arm] = {}
    for arm_name, spec in arms_data.items():
        spec = spec or {}
        arm_where = f"{where}: arm {arm_name!r}"
        if not isinstance(arm_name, str) or "/" in arm_name or not arm_name:
            raise StudyError(f"{where}: arm name {arm_name!r} must be a folder name")
        if not isinstance(spec, Mapping) or set(spec) - {"configs", "overrides"}:
            raise StudyError(f"{arm_where}: an arm may hold only configs and overrides")
        configs = common_configs + _config_list(spec.get("configs"), arm_where)
        for path in configs:
            resolve_config(path, source)
        overrides = common_overrides + _override_args(spec.get("overrides"), arm_where)
        arms[arm_name] = Arm(arm_name, tuple(configs), tuple(overrides))
    reference = data.get("reference")
    if reference not in arms:
        raise StudyError(f"{where}: reference must name one of the arms {list(arms)}, got {reference!r}")
    return Study(
        name=name, arms=arms, seeds=tuple(seeds), reference=reference, split=split,
        directions=_directions(data.get("directions"), where), source=source,
    )


def load_study(path: str | Path) -> Study:
    """Read and validate a study file.

    Raises:
        FileNotFoundError: the file does not exist.
        StudyError: invalid YAML or a malformed field (the message names the file).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"study file not found: {source}")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise StudyError(f"{source}: not valid YAML: {err}") from err
    return parse_study(data, source)


def study_from_folder(folder: Path) -> dict[str, Any]:
    """The plain study description that ``polytask study run`` wrote into ``folder/study.json``.

    Raises:
        StudyError: the folder holds no study description.
    """
    path = folder / "study.json"
    if not path.is_file():
        raise StudyError(f"{folder} is not a study folder: {path.name} is missing (made by 'polytask study run')")
    return json.loads(path.read_text(encoding="utf-8"))


def run_folder(study_dir: Path, arm: str, seed: int) -> Path:
    """The folder of one run: ``<study_dir>/runs/<arm>/seed<seed>``."""
    return study_dir / "runs" / arm / f"seed{seed}"


def arm_seed_pairs(study: Study) -> Sequence[tuple[str, int]]:
    """Every ``(arm, seed)`` of the study, seed-major so that a partial study holds whole seeds."""
    return [(arm, seed) for seed in study.seeds for arm in study.arms]
