"""A config built for benchmarking: its datamodule and module at the benchmark's resolution and batch size, with pretrained weights off; and the configs of the repository a benchmark can run."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from torch.utils.data import Dataset

from polytask.data.datamodule import MultiTaskDataModule
from polytask.data.registry import build_datamodule, datamodule_class
from polytask.models.base import MultiTaskNet
from polytask.profiling.timing import error_line
from polytask.tasks import Task
from polytask.training.module import MultiTaskModule

RESOLUTION_KEYS = ("image_size", "train_size", "crop_size")
"""Datamodule options that set the resolution of the images, in order of preference."""


@dataclass
class Experiment:
    """A config's datamodule and module, built for benchmarking.

    Attributes:
        configs: the config files, merged in order over polytask's defaults.
        overrides: extra command-line overrides.
        datamodule: the instantiated datamodule (its files are not touched yet), or a
            :class:`FilelessDataModule` standing in for one that could not be built.
        module: the :class:`MultiTaskModule` holding the network.
        batch_size: images per step.
        image_size: ``(H, W)`` asked for, or the config's resolution (datamodule option, else the
            net's ``image_size``); ``None`` when neither tells it (the loader's batches may).
        full_image_size: the config's resolution when ``max_pixels`` reduced it, else ``None``.
        data_error: why the real datamodule could not be built (absent dataset root...), else ``None``.
        notes: adjustments made to the config (pretrained weights, resolution, dataset size).
    """

    configs: list[str]
    overrides: list[str]
    datamodule: MultiTaskDataModule
    module: MultiTaskModule
    batch_size: int
    image_size: tuple[int, int] | None = None
    full_image_size: tuple[int, int] | None = None
    data_error: str | None = None
    notes: list[str] = field(default_factory=list)


class DataUnavailableError(RuntimeError):
    """The config's datamodule needs its files, even to tell its tasks: nothing can be benchmarked."""


class FilelessDataModule(MultiTaskDataModule):
    """Stands in for a datamodule that cannot be built without its files: its tasks, no data.

    The tasks and loss weights come from the real class's ``available_tasks`` and
    ``default_loss_weights`` called on an instance made without ``__init__``, so this works for
    datamodules whose tasks do not depend on their files (NYUD, PASCAL-Context); for others the
    construction fails and the config cannot be benchmarked without its data.

    Args:
        source: class path of the real datamodule.
        tasks: the real datamodule's ``tasks`` option.
        batch_size: images per step.
    """

    def __init__(self, source: str, tasks: Sequence[str] | None = None, batch_size: int = 8) -> None:
        cls = datamodule_class(source)
        self.source = cls.__new__(cls)
        self.name = f"{cls.name} (files absent)"
        super().__init__(tasks, batch_size)

    def available_tasks(self) -> list[Task]:
        return self.source.available_tasks()

    def default_loss_weights(self) -> Mapping[str, float]:
        return self.source.default_loss_weights()

    def make_dataset(self, split: str) -> Dataset:
        raise FileNotFoundError(f"{self.name}: no dataset files")


def _config_cli(config_paths: Sequence[str], overrides: Sequence[str]) -> Any:
    """Parse configs as :func:`polytask.config.instantiate` does (same CLI options), without instantiating anything."""
    from polytask.config import PolytaskCLI, config_cli

    class ParseOnly(PolytaskCLI):
        """Stops after parsing, so the config can be adjusted before the classes are built."""

        def instantiate_classes(self) -> None:
            return None

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return config_cli(ParseOnly, config_paths, overrides)


def _as_size(value: object) -> tuple[int, int] | None:
    """``(H, W)`` from a pair, or from one int (square images); ``None`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        return int(value[0]), int(value[1])
    return None


def _configured_size(datamodule: MultiTaskDataModule, data_args: Any, net: MultiTaskNet) -> tuple[int, int] | None:
    """The config's resolution: the datamodule's resolution option (as resolved, else as given), else the net's."""
    for key in RESOLUTION_KEYS:
        size = _as_size(getattr(datamodule, key, None)) or _as_size(data_args.get(key))
        if size is not None:
            return size
    return _as_size(net.image_size)


def reduced_size(size: Sequence[int], max_pixels: int, multiple: int = 32) -> tuple[int, int]:
    """``size`` scaled down (aspect kept, sides multiples of ``multiple``) to at most about ``max_pixels`` pixels."""
    h, w = int(size[0]), int(size[1])
    if h * w <= max_pixels:
        return h, w
    scale = math.sqrt(max_pixels / (h * w))
    return max(multiple, round(h * scale / multiple) * multiple), max(multiple, round(w * scale / multiple) * multiple)


def _parsed_size(data_args: Any, net_args: Any) -> tuple[int, int] | None:
    """The resolution a parsed config states: a datamodule resolution option, else the ViT's ``img_size``."""
    for key in RESOLUTION_KEYS:
        size = _as_size(data_args.get(key))
        if size is not None:
            return size
    return _as_size((net_args.get("backbone_options") or {}).get("img_size"))


def _set_image_size(data_args: Any, net_args: Any, size: tuple[int, int], notes: list[str]) -> bool:
    """Write ``size`` into the datamodule's resolution option and the net's ``backbone_options.img_size``.

    Returns:
        Whether ``img_size`` was set (to be dropped again if the backbone refuses it).
    """
    key = next((k for k in RESOLUTION_KEYS if k in data_args), None)
    if key is None:
        notes.append("the datamodule has no resolution option: its loader keeps its own size")
    elif isinstance(data_args[key], int) and size[0] != size[1]:
        notes.append(f"{key} is one int (square images): the loader keeps its own size")
    else:
        data_args[key] = size[0] if isinstance(data_args[key], int) else list(size)
    if "backbone_options" not in net_args:
        return False
    net_args.backbone_options = {**(net_args.backbone_options or {}), "img_size": list(size)}
    return True


def _is_img_size_error(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) says a (CNN) backbone does not take ``img_size``."""
    while err is not None:
        if isinstance(err, TypeError) and "img_size" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _instantiate(cli: Any, cfg: Any, vit_size_set: bool) -> Any:
    """Build the classes of ``cfg``; drop ``backbone_options.img_size`` again if the backbone refuses it."""
    try:
        return cli.parser.instantiate(cfg)
    except Exception as err:
        if not (vit_size_set and _is_img_size_error(err)):
            raise
    net_args = cfg.model.init_args.net.init_args
    options = {k: v for k, v in net_args.backbone_options.items() if k != "img_size"}
    net_args.backbone_options = options or None
    return cli.parser.instantiate(cfg)


def _root_cause(err: BaseException) -> BaseException:
    """The first error of the chain ``err`` was raised from."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _data_error(cfg: Any) -> str | None:
    """Why the config's datamodule cannot be built (e.g. its dataset root is absent), or ``None``."""
    try:
        build_datamodule(cfg.data)
    except Exception as err:  # noqa: BLE001 - reported; a FilelessDataModule stands in
        return f"{type(err).__name__}: {err}"
    return None


def load_experiment(
    config_paths: Sequence[str],
    overrides: Sequence[str] = (),
    image_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    loader_batches: int | None = None,
    max_pixels: int | None = None,
) -> Experiment:
    """Build a config's datamodule and module (no trainer, no logger, no callbacks).

    Pretrained weights are switched off (they do not change speed, and need a download).

    Args:
        config_paths: config files, merged in order over polytask's defaults.
        overrides: ``--key value`` overrides, as on the ``fit`` command line.
        image_size: ``(H, W)`` to run at; sets the datamodule's resolution option and, when the net
            takes ``backbone_options``, the ViT ``img_size`` (dropped again for backbones that refuse it).
        batch_size: sets ``data.init_args.batch_size``.
        loader_batches: batches the loader measurement reads; a ``num_train`` option of the
            datamodule (synthetic datasets) is capped to ``(loader_batches + 1) * batch_size``, so
            the measurement does not generate a whole training split.
        max_pixels: without ``image_size``, a config resolution of more pixels is scaled down to
            about this many (:func:`reduced_size`); the config's own size is kept in ``full_image_size``.
    """
    cli = _config_cli(config_paths, overrides)
    cfg = cli.config
    cfg.trainer.logger = False
    cfg.trainer.callbacks = None
    data_args = cfg.data.init_args
    net_args = cfg.model.init_args.net.init_args
    notes: list[str] = []
    if net_args.get("pretrained") or net_args.get("pretrained_file"):
        notes.append("pretrained weights not loaded (random init: same speed)")
        net_args.pretrained = False
        if "pretrained_file" in net_args:
            net_args.pretrained_file = None
    if batch_size is not None:
        data_args.batch_size = int(batch_size)
    if loader_batches is not None and "num_train" in data_args:
        needed = (loader_batches + 1) * int(data_args.batch_size)
        if data_args.num_train > needed:
            notes.append(f"num_train {data_args.num_train} -> {needed}: the loader measurement reads {needed} samples")
            data_args.num_train = needed
    size = (int(image_size[0]), int(image_size[1])) if image_size is not None else None
    full_size = _parsed_size(data_args, net_args) if size is None and max_pixels is not None else None
    if full_size is not None and reduced_size(full_size, max_pixels) != full_size:
        size = reduced_size(full_size, max_pixels)
        notes.append(f"reduced from {full_size[0]}x{full_size[1]} to {size[0]}x{size[1]} (max {max_pixels} pixels)")
    else:
        full_size = None
    vit_size_set = _set_image_size(data_args, net_args, size, notes) if size is not None else False
    data_error = _data_error(cfg)
    source = cfg.data.class_path
    if data_error is not None:
        cfg.data = Namespace(
            class_path=f"{__name__}.FilelessDataModule",
            init_args=Namespace(source=cfg.data.class_path, tasks=data_args.get("tasks"), batch_size=data_args.batch_size),
        )
    try:
        init = _instantiate(cli, cfg, vit_size_set)
    except Exception as err:
        if data_error is None:
            raise
        cause = _root_cause(err)
        raise DataUnavailableError(
            f"{source}: {data_error}; its tasks cannot be told without its files either ({error_line(cause)}). "
            "Point data.init_args.root at the dataset (or a small copy of it)."
        ) from err
    datamodule, module = init.data, init.model
    return Experiment(
        configs=[str(p) for p in config_paths],
        overrides=list(overrides),
        datamodule=datamodule,
        module=module,
        batch_size=int(datamodule.batch_size),
        image_size=size or _configured_size(datamodule, data_args, module.net),
        full_image_size=full_size,
        data_error=data_error,
        notes=notes,
    )


def benchmark_configs(root: str | Path) -> list[Path]:
    """Every config under ``root`` (recursively) that sets a model or a dataset, sorted.

    Configs that set only trainer options (``configs/trainer/*.yaml``) build the default network
    on the default data, so they have nothing of their own to benchmark.
    """
    found = []
    for path in sorted(Path(root).rglob("*.yaml")):
        content = yaml.safe_load(path.read_text()) or {}
        if isinstance(content, dict) and ({"model", "data"} & set(content)):
            found.append(path)
    return found


_FIT_USAGE = re.compile(r"polytask fit((?:\s+--config\s+\S+\.yaml)+)")


def config_chain(path: str | Path) -> list[Path]:
    """The configs to merge for ``path``: the chain of its header's ``polytask fit --config A --config B``
    usage line when that line names ``path`` (layered configs such as ablations only parse on top of
    their base), else ``path`` alone. Paths in the usage line are relative to the folder holding ``configs/``.
    """
    path = Path(path).resolve()
    repo = next((p.parent for p in path.parents if p.name == "configs"), path.parent)
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        usage = _FIT_USAGE.search(line)
        if usage is None:
            continue
        chain = [(repo / c).resolve() for c in re.findall(r"--config\s+(\S+\.yaml)", usage.group(1))]
        if path in chain and all(c.is_file() for c in chain):
            return chain
    return [path]
