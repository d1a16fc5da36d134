"""``polytask bench``: speed, memory, parameters and FLOPs of a config's network, and ratios measured in one run.

For the network a config builds (any ``polytask fit`` config; several ``--config`` files are merged
in order, as for ``fit``), at the config's resolution, ``--image-size``, or a resolution reduced to
``--max-pixels``:

* **training step** (``zero_grad`` + :class:`MultiTaskModule`'s ``training_step`` + backward +
  optimizer step, the config's optimizer) and **inference** (``eval`` mode, ``inference_mode``);
* in every precision of ``--modes`` (``fp32``; ``bf16``: ``torch.autocast`` with bfloat16, as
  Lightning's ``bf16-mixed``), eager and, with ``--compile``, ``torch.compile``;
* the same for the **bare network**: the net's ``backbone`` (or ``trunk``) with one Conv1x1 per dense
  task on its last feature map and bilinear upsampling (GAP + Linear for image-level tasks);
* the **per-task mode** of nets that have one (``forward_task(images, name)``, e.g. ETR-NLP's
  :class:`~polytask.models.etr_nlp.net.RoutedNet`): every task's forward in turn, and per-task
  training (one forward, backward and optimizer step per task, as ``PerTaskModule``);
* **peak memory** of one call above what is held before it, gradients freed before it (so the
  gradients count; parameters and optimizer state do not): on CUDA
  ``torch.cuda.max_memory_allocated``; on the CPU the torch profiler's accounting of the CPU
  allocator (the running ``Total Allocated`` of its memory events), because ``tracemalloc`` does
  not see torch's allocations and ``ru_maxrss`` is a process-wide high-water mark that cannot go
  down between variants;
* parameters and forward FLOPs (:func:`polytask.models.summary.summarize_model`), and the parameters that get
  no gradient in a training step (DDP's ``find_unused_parameters``);
* with ``--profile N``, the N operators with the most self time in one call of every variant;
* samples/s of the config's training loader (:mod:`polytask.bench_loader`), next to the training
  step's samples/s;
* with ``--versus B`` (several are merged in order, as ``--config``), another config timed against
  this one in the same interleaved run, at the same resolution and batch size (``--image-size`` /
  ``--batch-size`` or the first config's) and with the same overrides: every variant both sides
  run (same precisions, eager/compiled, train/infer) gets ``time(B) / time(A)`` of their medians.

Inputs: the loader's first batch (brought to the benchmark's resolution and batch size). When the
dataset's files are absent the loader is skipped with the reason and random images and targets
of the sample contract are used; a :class:`FilelessDataModule` supplies the tasks when the real
datamodule cannot even be built. Pretrained weights are never loaded (same speed, no download).

Timing method: every variant is warmed up (``--warmup`` calls; torch.compile compiles there),
then the variants are interleaved, ``--steps`` rounds of one call each (the starting variant
rotates every round), and each variant reports the median of its calls. Ratios are those of
medians measured in the same run, so machine noise shifts all variants alike.

Usage::

    polytask bench --config configs/taskexpert_synthscenes.yaml --modes fp32,bf16 --compile --json out.json
    polytask bench --config CFG --image-size 224 224 -- --model.net.init_args.backbone vit_small_patch16_224
    polytask bench --config configs/hard_sharing_synthscenes.yaml --versus configs/etr_nlp_synthscenes.yaml --image-size 64 64

Arguments that are not bench options are config overrides, as on the ``fit`` command line (after a
``--`` separator, even those that look like bench options).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from jsonargparse import Namespace
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import Dataset

from polytask.bench_loader import LoaderStats, measure_loader
from polytask.data.datamodule import MultiTaskDataModule, build_datamodule, datamodule_class
from polytask.models.summary import summarize_model
from polytask.tasks import AttributeTask, DepthTask, EdgeTask, NormalsTask, SaliencyTask, SegmentationTask, Task
from polytask.training.module import MultiTaskModule
from polytask.utils.files import write_json_atomic

PRECISIONS = ("fp32", "bf16")
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


def _configured_size(datamodule: MultiTaskDataModule, data_args: Any, net: nn.Module) -> tuple[int, int] | None:
    """The config's resolution: the datamodule's resolution option (as resolved, else as given), else the net's."""
    for key in RESOLUTION_KEYS:
        size = _as_size(getattr(datamodule, key, None)) or _as_size(data_args.get(key))
        if size is not None:
            return size
    return _as_size(getattr(net, "image_size", None))


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
            f"{source}: {data_error}; its tasks cannot be told without its files either ({_error_line(cause)}). "
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


def synthetic_batch(tasks: Sequence[Task], batch_size: int, image_size: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Random images ``(B, 3, H, W)`` and random targets of the sample contract for ``tasks``.

    Raises:
        TypeError: a task kind whose targets are unknown here.
    """
    generator = torch.Generator().manual_seed(0)
    b, (h, w) = batch_size, (int(image_size[0]), int(image_size[1]))
    batch: dict[str, torch.Tensor] = {"image": torch.randn(b, 3, h, w, generator=generator)}
    for task in tasks:
        if isinstance(task, SegmentationTask):
            target = torch.randint(0, task.num_classes, (b, h, w), generator=generator)
        elif isinstance(task, SaliencyTask):
            target = torch.randint(0, 2, (b, h, w), generator=generator)
        elif isinstance(task, NormalsTask):
            target = F.normalize(torch.randn(b, 3, h, w, generator=generator), dim=1)
        elif isinstance(task, EdgeTask):
            target = (torch.rand(b, 1, h, w, generator=generator) < 0.1).float()
        elif isinstance(task, DepthTask):
            target = 0.5 + 9.5 * torch.rand(b, 1, h, w, generator=generator)
        elif isinstance(task, AttributeTask):
            target = torch.randint(0, 2, (b, task.out_channels), generator=generator).float()
        else:
            raise TypeError(f"no random targets for task {task.name!r} of kind {type(task).__name__}")
        batch[task.name] = target
    return {k: v.to(device) for k, v in batch.items()}


def fit_batch(batch: Mapping[str, torch.Tensor], batch_size: int, image_size: Sequence[int]) -> dict[str, torch.Tensor]:
    """A loader batch brought to ``batch_size`` images of ``image_size``.

    Samples are repeated (or dropped) along the batch axis; the image is resized bilinearly and
    every target whose last two axes are the image's size with nearest neighbours (labels and
    ignore values stay valid); image-level targets are kept.
    """
    images = batch["image"]
    source = tuple(images.shape[-2:])
    size = (int(image_size[0]), int(image_size[1]))
    pick = torch.arange(batch_size) % images.shape[0]
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        value = value[pick]
        if source != size and value.dim() >= 3 and tuple(value.shape[-2:]) == source:
            if key == "image":
                value = F.interpolate(value, size=size, mode="bilinear", align_corners=False)
            else:
                flat = value.reshape(value.shape[0], -1, *source)
                value = F.interpolate(flat.double(), size=size, mode="nearest").to(value.dtype)
                value = value.reshape(*value.shape[:1], *batch[key].shape[1:-2], *size)
        out[key] = value
    return out


def last_feature_map(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map ``(B, C, h, w)`` of ``images`` ``(B, 3, H, W)``.

    timm models with ``forward_intermediates`` (ViTs: tokens of the last block reshaped to a map)
    are read through it; other backbones must return a map or a list of maps (the last is taken).
    """
    if hasattr(backbone, "forward_intermediates"):
        return backbone.forward_intermediates(images, indices=1, output_fmt="NCHW", intermediates_only=True)[-1]
    out = backbone(images)
    if isinstance(out, (list, tuple)):
        out = out[-1]
    if not (isinstance(out, torch.Tensor) and out.dim() == 4):
        raise TypeError(f"{type(backbone).__name__} returns no feature map (B, C, h, w) or list of maps")
    return out


class BareNet(nn.Module):
    """A backbone and the plainest heads: the reference a multi-task network's overhead is measured against.

    Dense tasks: Conv1x1 on the backbone's last feature map, bilinear upsampling to the input size.
    Image-level tasks: global average pooling and a Linear layer.

    Args:
        backbone: the backbone module (shared with the network it comes from, not copied).
        channels: channels of its last feature map.
        tasks: the tasks to predict.
    """

    def __init__(self, backbone: nn.Module, channels: int, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.backbone = backbone
        self.dense = {t.name: t.dense for t in tasks}
        self.heads = nn.ModuleDict(
            {t.name: nn.Conv2d(channels, t.out_channels, 1) if t.dense else nn.Linear(channels, t.out_channels) for t in tasks}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{task: (B, C_t, H, W) or (B, C_t)}``."""
        features = last_feature_map(self.backbone, images)
        size = images.shape[-2:]
        return {
            name: F.interpolate(head(features), size=size, mode="bilinear", align_corners=False)
            if self.dense[name]
            else head(features.mean(dim=(2, 3)))
            for name, head in self.heads.items()
        }


def make_bare_net(net: nn.Module, tasks: Sequence[Task], image_size: Sequence[int]) -> tuple[BareNet | None, str | None]:
    """The :class:`BareNet` of ``net``'s ``backbone`` (or ``trunk``), or ``None`` and the reason it cannot be built."""
    name = next((n for n in ("backbone", "trunk") if isinstance(getattr(net, n, None), nn.Module)), None)
    if name is None:
        return None, f"{type(net).__name__} has no `backbone` or `trunk` module"
    backbone = getattr(net, name)
    device = next(net.parameters()).device
    was_training = backbone.training
    try:
        with torch.no_grad():
            probe = last_feature_map(backbone.eval(), torch.zeros(1, 3, *image_size, device=device))
    except Exception as err:  # noqa: BLE001 - any failure means the backbone does not run on its own
        return None, f"{type(net).__name__}.{name} does not run outside the net: {type(err).__name__}: {err}"
    finally:
        backbone.train(was_training)
    return BareNet(backbone, int(probe.shape[1]), tasks).to(device), None


@dataclass
class Variant:
    """One timed configuration: which network, precision, eager or compiled, training or inference."""

    net: str
    precision: str
    compiled: bool
    phase: str
    prepare: Callable[[], None]
    run: Callable[[], None]

    @property
    def key(self) -> str:
        """``net/precision/eager|compiled/phase``."""
        return f"{self.net}/{self.precision}/{'compiled' if self.compiled else 'eager'}/{self.phase}"


@dataclass
class Result:
    """Measured times (seconds) and peak memory of one variant."""

    net: str
    precision: str
    compiled: bool
    phase: str
    times_s: list[float]
    batch_size: int
    peak_mem_mb: float | None = None

    @property
    def key(self) -> str:
        return f"{self.net}/{self.precision}/{'compiled' if self.compiled else 'eager'}/{self.phase}"

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def samples_per_s(self) -> float:
        return self.batch_size / self.median_s

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON (times in milliseconds)."""
        return {
            "key": self.key,
            "net": self.net,
            "precision": self.precision,
            "compiled": self.compiled,
            "phase": self.phase,
            "median_ms": 1e3 * self.median_s,
            "min_ms": 1e3 * min(self.times_s),
            "times_ms": [1e3 * t for t in self.times_s],
            "samples_per_s": self.samples_per_s,
            "peak_mem_mb": self.peak_mem_mb,
        }


def _autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _error_line(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def time_interleaved(
    variants: Sequence[Variant], warmup: int, repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Warm every variant up, then time ``repeats`` interleaved rounds of one call per variant.

    A variant that raises (e.g. torch.compile without a C++ compiler) is dropped from then on.

    Returns:
        Seconds per call of every variant that ran through, and the error of every variant that
        failed, by variant key.
    """
    failed: dict[str, str] = {}
    ready: list[Variant] = []
    for variant in variants:
        try:
            for _ in range(warmup):
                variant.prepare()
                variant.run()
            ready.append(variant)
        except Exception as err:  # noqa: BLE001 - reported as a skipped variant
            failed[variant.key] = _error_line(err)
    times: dict[str, list[float]] = {v.key: [] for v in ready}
    for round_ in range(repeats):
        for i in range(len(ready)):
            variant = ready[(round_ + i) % len(ready)]
            if variant.key in failed:
                continue
            variant.prepare()
            _sync(device)
            start = time.perf_counter()
            try:
                variant.run()
            except Exception as err:  # noqa: BLE001 - reported as a skipped variant
                failed[variant.key] = _error_line(err)
                continue
            _sync(device)
            times[variant.key].append(time.perf_counter() - start)
    return {k: v for k, v in times.items() if k not in failed}, failed


def peak_memory_mb(run: Callable[[], None], device: torch.device) -> float:
    """Peak tensor memory (MiB) allocated by one call of ``run`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the torch profiler's CPU-allocator accounting
    (``Total Allocated`` of its memory events, relative to the start of the call).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), key=lambda e: e["ts"])
    if not memory:
        return 0.0
    base = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(0, max(e["args"]["Total Allocated"] for e in memory) - base) / 2**20


def _step_module(module: MultiTaskModule, net: nn.Module) -> MultiTaskModule:
    """A module with ``module``'s tasks and loss weights around ``net``: its ``training_step`` is the real one."""
    return MultiTaskModule(net=lambda tasks: net, tasks=module.tasks, loss_weights=module.loss_weights)


def _train_call(step: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, precision: str, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            loss = step()
        loss.backward()
        optimizer.step()

    return run


def _infer_call(forward: Callable[[], object], precision: str, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode(), _autocast(precision, device):
            forward()

    return run


def _per_task_train_call(
    task_forward: Callable[[torch.Tensor, str], torch.Tensor],
    module: MultiTaskModule,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    precision: str,
    device: torch.device,
) -> Callable[[], None]:
    """Per-task training as :class:`~polytask.training.per_task.PerTaskModule` does it: for every
    task in turn, its own forward (``forward_task``), weighted loss, backward and optimizer step."""

    def run() -> None:
        for task in module.tasks:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(precision, device):
                loss = module.loss_weights[task.name] * task.loss(task_forward(batch["image"], task.name), batch[task.name])
            loss.backward()
            optimizer.step()

    return run


def build_variants(
    nets: Mapping[str, nn.Module],
    module: MultiTaskModule,
    batch: Mapping[str, torch.Tensor],
    precisions: Sequence[str],
    compile_nets: bool,
    device: torch.device,
) -> list[Variant]:
    """Training and inference variants of every net (``model``, ``bare``, ``per_task``) in every precision.

    ``model`` and ``bare`` train with :class:`MultiTaskModule`'s ``training_step`` (all tasks, one
    optimizer step); ``per_task`` is ``nets["per_task"]`` (the model) run through its
    ``forward_task``: inference is one call per task, training one step per task
    (:func:`_per_task_train_call`). Compiled variants compile ``forward`` (``forward_task`` for
    ``per_task``). All nets share one optimizer of the config's kind over their parameters.
    """
    params = {id(p): p for net in nets.values() for p in net.parameters() if p.requires_grad}
    optimizer = module.optimizer_factory(list(params.values()))
    images = batch["image"]
    variants: list[Variant] = []
    for name, net in nets.items():
        for compiled in (False, True) if compile_nets else (False,):
            if name == "per_task":
                task_forward = torch.compile(net.forward_task) if compiled else net.forward_task
                for precision in precisions:
                    train = _per_task_train_call(task_forward, module, batch, optimizer, precision, device)
                    infer = _infer_call(lambda f=task_forward: [f(images, t.name) for t in module.tasks], precision, device)
                    variants.append(Variant(name, precision, compiled, "train", net.train, train))
                    variants.append(Variant(name, precision, compiled, "infer", net.eval, infer))
                continue
            forward = torch.compile(net) if compiled else net
            step_module = _step_module(module, forward)
            for precision in precisions:
                train = _train_call(lambda m=step_module: m.training_step(batch, 0), optimizer, precision, device)
                infer = _infer_call(lambda f=forward: f(images), precision, device)
                variants.append(Variant(name, precision, compiled, "train", net.train, train))
                variants.append(Variant(name, precision, compiled, "infer", net.eval, infer))
    return variants


def ratios(results: Sequence[Result]) -> dict[str, float]:
    """Time ratios of medians measured in the same run (above 1: the first variant is slower).

    ``model_over_bare``, ``per_task_over_batched``, ``compiled_over_eager`` and ``bf16_over_fp32``,
    each keyed by the variant fields they hold fixed.
    """
    by_key = {r.key: r.median_s for r in results}
    out: dict[str, float] = {}

    def add(name: str, slow: str, fast: str) -> None:
        if slow in by_key and fast in by_key:
            out[name] = by_key[slow] / by_key[fast]

    for r in results:
        mode = "compiled" if r.compiled else "eager"
        if r.net == "model":
            add(f"model_over_bare/{r.precision}/{mode}/{r.phase}", r.key, f"bare/{r.precision}/{mode}/{r.phase}")
            add(f"per_task_over_batched/{r.precision}/{mode}/{r.phase}", f"per_task/{r.precision}/{mode}/{r.phase}", r.key)
        if r.compiled:
            add(f"compiled_over_eager/{r.net}/{r.precision}/{r.phase}", r.key, f"{r.net}/{r.precision}/eager/{r.phase}")
        if r.precision == "bf16":
            add(f"bf16_over_fp32/{r.net}/{mode}/{r.phase}", r.key, f"{r.net}/fp32/{mode}/{r.phase}")
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


@dataclass
class DeviceSide:
    """One experiment on one device, ready to time: its nets, its variants, what was skipped."""

    experiment: Experiment
    device: torch.device
    nets: dict[str, nn.Module]
    variants: list[Variant]
    batch_size: int
    skipped: dict[str, str]


def _device_side(
    experiment: Experiment,
    device: torch.device,
    batch: Mapping[str, torch.Tensor],
    precisions: Sequence[str],
    compile_nets: bool,
    with_bare: bool,
) -> DeviceSide:
    """Move ``experiment`` to ``device`` and build its variants (``model``, ``bare``, ``per_task``) on ``batch``."""
    module = experiment.module.to(device)
    net = module.net
    batch = {k: v.to(device) for k, v in batch.items()}
    image_size = tuple(batch["image"].shape[-2:])
    skipped: dict[str, str] = {}
    nets: dict[str, nn.Module] = {"model": net}
    if with_bare:
        bare, reason = make_bare_net(net, module.tasks, image_size)
        if bare is None:
            skipped["bare"] = str(reason)
        else:
            nets["bare"] = bare
    if callable(getattr(net, "forward_task", None)):
        nets["per_task"] = net
    else:
        skipped["per_task"] = f"{type(net).__name__} has no per-task mode (`forward_task`)"
    variants = build_variants(nets, module, batch, precisions, compile_nets, device)
    return DeviceSide(experiment, device, nets, variants, int(batch["image"].shape[0]), skipped)


def _measure_side(
    side: DeviceSide,
    times: Mapping[str, list[float]],
    failed: Mapping[str, str],
    memory: bool,
    loader: LoaderStats | None,
    profile_ops: int = 0,
) -> dict[str, Any]:
    """The device report of ``side`` from its timed calls: results, peak memory (with ``memory``),
    ratios, unused parameters, profiles and what was skipped."""
    device, nets, variants = side.device, side.nets, side.variants
    results = [Result(v.net, v.precision, v.compiled, v.phase, list(times[v.key]), side.batch_size) for v in variants if v.key in times]
    runs = {v.key: v for v in variants}
    for result in results if memory else ():
        runs[result.key].prepare()
        for n in nets.values():
            n.zero_grad(set_to_none=True)
        result.peak_mem_mb = peak_memory_mb(runs[result.key].run, device)
    unused = _unused_parameters(nets["model"], runs.get("model/fp32/eager/train"))
    profiles = {r.key: top_operators(runs[r.key], device, profile_ops) for r in results} if profile_ops else {}
    skipped = {**side.skipped, **{f"variant {k}": v for k, v in failed.items()}}
    measured = ratios(results)
    train = next((r for r in results if r.key == "model/fp32/eager/train"), None)
    if loader is not None and train is not None:
        measured["loader_over_train_samples_per_s"] = loader.samples_per_s / train.samples_per_s
    for n in nets.values():
        n.zero_grad(set_to_none=True)
    return {
        "device": device.type,
        "device_name": _device_name(device),
        "results": [r.as_dict() for r in results],
        "ratios": measured,
        "unused_parameters": unused,
        "profiles": profiles,
        "skipped": skipped,
    }


def bench_device(
    experiment: Experiment,
    device: torch.device,
    batch: Mapping[str, torch.Tensor],
    precisions: Sequence[str],
    compile_nets: bool,
    warmup: int,
    steps: int,
    with_bare: bool,
    memory: bool,
    loader: LoaderStats | None,
    profile_ops: int = 0,
) -> dict[str, Any]:
    """Time, and (with ``memory``) measure the peak memory of, every variant of ``experiment`` on ``device`` with ``batch``."""
    side = _device_side(experiment, device, batch, precisions, compile_nets, with_bare)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
        times, failed = time_interleaved(side.variants, warmup, steps, device)
        return _measure_side(side, times, failed, memory, loader, profile_ops)


def top_operators(variant: Variant, device: torch.device, count: int) -> list[dict[str, Any]]:
    """The ``count`` operators with the most self time in one profiled call of ``variant``.

    Returns:
        Rows ``{"op", "self_ms", "calls"}``, most expensive first (CPU self time; CUDA self time on GPUs).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    variant.prepare()
    with profile(activities=activities) as prof:
        variant.run()
        _sync(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)[:count]
    return [{"op": e.key, "self_ms": getattr(e, attribute) / 1e3, "calls": e.count} for e in events]


def _unused_parameters(net: nn.Module, train: Variant | None) -> list[str] | None:
    """Trainable parameters of ``net`` that get no gradient in one batched training step (``None``: not run).

    DDP needs ``strategy: ddp_find_unused_parameters_true`` for networks that have any.
    """
    if train is None:
        return None
    train.prepare()
    net.zero_grad(set_to_none=True)
    train.run()
    return [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]


def _tensors(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensor entries of a collated batch (``meta`` dropped)."""
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


@dataclass
class BenchInputs:
    """What a config is benchmarked with: the report's head (everything but the devices), the batch and the loader's speed."""

    report: dict[str, Any]
    batch: dict[str, torch.Tensor]
    loader: LoaderStats | None


def bench_inputs(
    experiment: Experiment,
    loader_batches: int = 10,
    with_bare: bool = True,
    fallback_image_size: Sequence[int] | None = None,
    warmup: int = 2,
    steps: int = 5,
) -> BenchInputs:
    """Measure the loader of ``experiment``, choose the benchmark batch and write the report's head.

    The loader is measured first; its first batch is the benchmark input (real targets, ignored
    pixels included; brought to the benchmark's resolution and batch size by :func:`fit_batch`).
    Without a loader, random images and targets (:func:`synthetic_batch`) are used.

    Raises:
        ValueError: the resolution is unknown (no ``--image-size``, no resolution option, no loader)
            and no ``fallback_image_size`` is given.
    """
    module = experiment.module.cpu()
    net = module.net
    skipped: dict[str, str] = {}
    loader: LoaderStats | None = None
    first: dict[str, torch.Tensor] | None = None
    if experiment.data_error is not None:
        skipped["loader"] = f"the datamodule cannot be built: {experiment.data_error}"
    elif loader_batches > 0:
        try:
            loader, first_batch = measure_loader(experiment.datamodule, loader_batches)
            first = _tensors(first_batch)
        except Exception as err:  # noqa: BLE001 - absent or broken dataset files: reported, model timing goes on
            skipped["loader"] = f"{type(err).__name__}: {err}"
    image_size = experiment.image_size or (tuple(first["image"].shape[-2:]) if first is not None else None)
    if image_size is None and fallback_image_size is None:
        raise ValueError("cannot tell the resolution of this config without its dataset files: pass --image-size H W")
    if image_size is None:
        image_size = fallback_image_size
        experiment.notes.append(f"resolution unknown without the dataset files: {image_size[0]}x{image_size[1]} assumed")
    image_size = (int(image_size[0]), int(image_size[1]))
    if first is None:
        inputs, batch = "random", synthetic_batch(module.tasks, experiment.batch_size, image_size, torch.device("cpu"))
    elif tuple(first["image"].shape) == (experiment.batch_size, 3, *image_size):
        inputs, batch = "loader batch", first
    else:
        inputs, batch = "loader batch, resized", fit_batch(first, experiment.batch_size, image_size)
    report: dict[str, Any] = {
        "configs": experiment.configs,
        "overrides": experiment.overrides,
        "model": type(net).__name__,
        "tasks": [t.name for t in module.tasks],
        "image_size": list(image_size),
        "full_image_size": list(experiment.full_image_size) if experiment.full_image_size else None,
        "batch_size": experiment.batch_size,
        "inputs": inputs,
        "warmup": warmup,
        "steps": steps,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "skipped": skipped,
        "summary": summarize_model(net, image_size).as_dict(),
        "loader": loader.as_dict() if loader is not None else None,
    }
    bare, _ = make_bare_net(net, module.tasks, image_size) if with_bare else (None, None)
    report["bare_summary"] = summarize_model(bare, image_size).as_dict() if bare is not None else None
    report["notes"] = list(experiment.notes)
    return BenchInputs(report, batch, loader)


def run_bench(
    experiment: Experiment,
    devices: Sequence[str],
    precisions: Sequence[str] = ("fp32",),
    compile_nets: bool = False,
    warmup: int = 2,
    steps: int = 5,
    loader_batches: int = 10,
    with_bare: bool = True,
    memory: bool = True,
    fallback_image_size: Sequence[int] | None = None,
    profile_ops: int = 0,
) -> dict[str, Any]:
    """Benchmark ``experiment`` on every device; returns the JSON report (see :func:`bench_main`).

    Inputs as :func:`bench_inputs` chooses them.

    Raises:
        ValueError: the resolution is unknown (no ``--image-size``, no resolution option, no loader)
            and no ``fallback_image_size`` is given.
    """
    inputs = bench_inputs(experiment, loader_batches, with_bare, fallback_image_size, warmup, steps)
    report = inputs.report
    report["devices"] = [
        bench_device(
            experiment, torch.device(d), inputs.batch, precisions, compile_nets, warmup, steps, with_bare, memory, inputs.loader,
            profile_ops,
        )
        for d in devices
    ]
    experiment.module.cpu()
    report["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


VERSUS_SIDES = ("base", "versus")
"""Tags of the two sides of a ``--versus`` run: ``--config`` (base) and ``--versus``."""


def _on_side(variant: Variant, side: str) -> Variant:
    """``variant`` tagged with its side (``side:`` before its key), for timing both sides in one list."""
    return replace(variant, net=f"{side}:{variant.net}")


def interleave_sides(base: Sequence[Variant], other: Sequence[Variant]) -> list[Variant]:
    """The variants of both sides in timing order: every base variant directly followed by the
    other side's variant of the same key, then the other side's variants the base does not have.

    Keys are tagged ``base:`` and ``versus:``. :func:`time_interleaved` runs the list in rounds
    (rotated by one each round), so the two calls of a common variant alternate in every round.
    """
    others = {v.key: v for v in other}
    order: list[Variant] = []
    for variant in base:
        order.append(_on_side(variant, "base"))
        if variant.key in others:
            order.append(_on_side(others.pop(variant.key), "versus"))
    order += [_on_side(v, "versus") for v in other if v.key in others]
    return order


def _side_entries(entries: Mapping[str, Any], side: str) -> dict[str, Any]:
    """The entries of one side of a ``--versus`` timing, keys without their ``side:`` tag."""
    prefix = f"{side}:"
    return {k[len(prefix) :]: v for k, v in entries.items() if k.startswith(prefix)}


def versus_comparison(base: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For every variant both sides ran: both medians and ``time(versus) / time(base)`` (above 1: versus is slower).

    Args:
        base: result rows (:meth:`Result.as_dict`) of the ``--config`` side.
        other: result rows of the ``--versus`` side.
    """
    medians = {r["key"]: r["median_ms"] for r in other}
    return [
        {
            "key": r["key"],
            "base_median_ms": r["median_ms"],
            "versus_median_ms": medians[r["key"]],
            "ratio": medians[r["key"]] / r["median_ms"],
        }
        for r in base
        if r["key"] in medians
    ]


def run_versus(
    base: Experiment,
    base_inputs: BenchInputs,
    other: Experiment,
    other_inputs: BenchInputs,
    device: str,
    precisions: Sequence[str] = ("fp32",),
    compile_nets: bool = False,
    warmup: int = 2,
    steps: int = 5,
    with_bare: bool = True,
    memory: bool = True,
    profile_ops: int = 0,
) -> dict[str, Any]:
    """Time the variants of two experiments against each other in one interleaved run on ``device``.

    Both sides' variants (the same selection: nets, precisions, eager/compiled, train/infer) are
    timed in one :func:`time_interleaved` call in the order of :func:`interleave_sides`, so every
    call of a variant of one side is next to the call of the same variant of the other side and
    machine noise shifts both alike. Memory, unused parameters and profiles are then measured per side.

    Returns:
        The base's report (:func:`bench_main`) with a ``versus`` entry: the other side's report
        (its own ``configs``, ``summary``, ``devices``...), plus ``comparison`` (rows of
        :func:`versus_comparison`) and ``ratios`` (``versus_over_base/<key>``: time(versus) / time(base)).
    """
    torch_device = torch.device(device)
    sides = {
        "base": _device_side(base, torch_device, base_inputs.batch, precisions, compile_nets, with_bare),
        "versus": _device_side(other, torch_device, other_inputs.batch, precisions, compile_nets, with_bare),
    }
    loaders = {"base": base_inputs.loader, "versus": other_inputs.loader}
    order = interleave_sides(sides["base"].variants, sides["versus"].variants)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
        times, failed = time_interleaved(order, warmup, steps, torch_device)
        devices = {
            name: _measure_side(side, _side_entries(times, name), _side_entries(failed, name), memory, loaders[name], profile_ops)
            for name, side in sides.items()
        }
    report = base_inputs.report
    report["devices"] = [devices["base"]]
    versus = other_inputs.report
    versus["devices"] = [devices["versus"]]
    versus["comparison"] = versus_comparison(devices["base"]["results"], devices["versus"]["results"])
    versus["ratios"] = {f"versus_over_base/{row['key']}": row["ratio"] for row in versus["comparison"]}
    report["versus"] = versus
    base.module.cpu()
    other.module.cpu()
    report["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def render_report(report: Mapping[str, Any], console: Console) -> None:
    """Print the tables of a bench report."""
    summary = report["summary"]
    h, w = report["image_size"]
    header = (
        f"{report['model']} on {', '.join(report['configs']) or 'the defaults'}: {h}x{w}, batch {report['batch_size']}, "
        f"{summary['total_params'] / 1e6:.2f} M params, {summary['gflops']:.2f} GFLOPs/image"
    )
    if report.get("bare_summary"):
        bare = report["bare_summary"]
        header += f" (bare: {bare['total_params'] / 1e6:.2f} M, {bare['gflops']:.2f} GFLOPs)"
    for device in report["devices"]:
        table = Table(title=f"{header}\n{device['device_name']}")
        for column in ("net", "precision", "mode", "phase"):
            table.add_column(column)
        for column in ("median ms", "samples/s", "peak MiB"):
            table.add_column(column, justify="right")
        for r in device["results"]:
            mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            mode = "compiled" if r["compiled"] else "eager"
            table.add_row(r["net"], r["precision"], mode, r["phase"], f"{r['median_ms']:.1f}", f"{r['samples_per_s']:.1f}", mem)
        console.print(table)
        if device["ratios"]:
            ratio_table = Table(title="time ratios (same run)")
            ratio_table.add_column("ratio")
            ratio_table.add_column("value", justify="right")
            for name, value in device["ratios"].items():
                ratio_table.add_row(name, f"{value:.3f}")
            console.print(ratio_table)
        for key, rows in device.get("profiles", {}).items():
            ops = ", ".join(f"{r['op']} {r['self_ms']:.1f} ms ({r['calls']}x)" for r in rows)
            console.print(f"profile {key}: {ops}")
        unused = device.get("unused_parameters")
        if unused:
            console.print(f"{len(unused)} parameter tensors get no gradient in a training step (DDP: find_unused_parameters), e.g. {unused[:3]}")
        for what, reason in device["skipped"].items():
            console.print(f"[yellow]skipped {what}[/]: {reason}")
    loader = report.get("loader")
    if loader is not None:
        console.print(
            f"loader: {loader['samples_per_s']:.1f} samples/s ({loader['batches']} batches of {loader['batch_size']}, "
            f"{loader['num_workers']} workers, first batch {loader['first_batch_s']:.2f} s)"
        )
    for what, reason in report["skipped"].items():
        console.print(f"[yellow]skipped {what}[/]: {reason}")
    for note in report["notes"]:
        console.print(f"note: {note}")


def render_versus(report: Mapping[str, Any], console: Console) -> None:
    """Print the comparison table of a ``--versus`` report: both medians and their ratio per common variant."""
    versus = report["versus"]
    h, w = report["image_size"]
    title = (
        f"{versus['model']} ({', '.join(versus['configs'])}) versus {report['model']} "
        f"({', '.join(report['configs']) or 'the defaults'}): {h}x{w}, batch {report['batch_size']}, one interleaved run"
    )
    table = Table(title=title)
    for column in ("variant", "base ms", "versus ms", "versus / base"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in versus["comparison"]:
        table.add_row(row["key"], f"{row['base_median_ms']:.1f}", f"{row['versus_median_ms']:.1f}", f"{row['ratio']:.3f}")
    console.print(table)
    if not versus["comparison"]:
        console.print("[yellow]no variant ran on both sides[/]")


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polytask bench",
        description="Time training steps and inference, measure memory, parameters and FLOPs of a config's network.",
        epilog="Other arguments are config overrides, as for `polytask fit` (e.g. --model.init_args.net.init_args.width 64); "
        "after a `--` separator even those that look like bench options.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", action="append", default=[], help="config file; several are merged in order")
    parser.add_argument(
        "--versus", action="append", default=[], metavar="CONFIG",
        help="time this config (several are merged in order) against the --config ones in one interleaved run, "
        "at the same resolution and batch size; reports time(versus) / time(config) for every common variant",
    )
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="input resolution (default: the config's)")
    parser.add_argument(
        "--fallback-image-size", type=int, nargs=2, metavar=("H", "W"),
        help="resolution to assume when the config does not tell it (a dataset whose size comes from its absent files)",
    )
    parser.add_argument(
        "--max-pixels", type=int, help="without --image-size, scale a larger config resolution down to about this many pixels"
    )
    parser.add_argument("--batch-size", type=int, help="images per step (default: the config's batch_size)")
    parser.add_argument(
        "--device", action="append", choices=("cpu", "cuda"),
        help="device to run on; repeat for several (default: cuda when available, else cpu)",
    )
    parser.add_argument("--modes", default="fp32", help="comma-separated precisions: fp32, bf16 (default: fp32)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per variant before timing")
    parser.add_argument("--loader-batches", type=int, default=10, help="training-loader batches to time (0: skip)")
    parser.add_argument("--bare", action=argparse.BooleanOptionalAction, default=True, help="time the bare backbone + Conv1x1 heads too")
    parser.add_argument("--threads", type=int, help="torch CPU threads during the run (default: torch's, one per core)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory (one profiled call per variant)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="record the N operators with most self time per variant")
    parser.add_argument("--json", type=Path, help="write the report to this JSON file")
    return parser


def bench_main(args: Sequence[str]) -> int:
    """``polytask bench``: benchmark the network of a config and print (and optionally save) the report.

    The JSON report holds ``configs``, ``model``, ``tasks``, ``image_size``, ``batch_size``,
    ``summary`` and ``bare_summary`` (parameters, FLOPs), ``loader`` (samples/s or null), ``notes``,
    ``skipped`` (what was not measured and why) and ``devices``: per device its ``results`` (one
    row per variant: ``median_ms``, ``samples_per_s``, ``peak_mem_mb``, the raw ``times_ms``...),
    ``ratios`` and ``skipped``. With ``--versus`` (one device), ``versus`` holds the other side's
    report (same fields: its ``configs``, ``summary``, ``devices``...) plus ``comparison`` (per
    common variant: ``key``, ``base_median_ms``, ``versus_median_ms``, ``ratio``) and ``ratios``
    (``versus_over_base/<net>/<precision>/<eager|compiled>/<phase>``: time(versus) / time(base),
    medians of the same interleaved run).

    Returns:
        The exit status: 0, or 2 when nothing could be measured (a datamodule that needs its
        absent files even to tell its tasks; the reason is printed and is the JSON's ``skipped.bench``).
    """
    args = list(args)
    # the profiler's library (Kineto) logs GPU probing errors on CPU-only machines; a user's own level wins
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    from polytask.cli.args import parse_tool_args

    options, overrides = parse_tool_args(_parser(), args)
    precisions = [p.strip() for p in options.modes.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise SystemExit(f"polytask bench: unknown mode(s) {unknown}; choose from {list(PRECISIONS)}")
    devices = options.device or ["cuda" if torch.cuda.is_available() else "cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("polytask bench: --device cuda, but CUDA is not available")
    if options.versus and len(devices) > 1:
        raise SystemExit("polytask bench: --versus compares two configs on one device; give one --device")
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        return _bench(options, overrides, precisions, devices)
    finally:
        torch.set_num_threads(threads)


def _bench(options: argparse.Namespace, overrides: list[str], precisions: list[str], devices: list[str]) -> int:
    """Build, measure, print and save; the exit status of :func:`bench_main`."""
    loader_batches = max(0, options.loader_batches)
    try:
        experiment = load_experiment(
            options.config,
            overrides,
            image_size=options.image_size,
            batch_size=options.batch_size,
            loader_batches=loader_batches,
            max_pixels=options.max_pixels,
        )
    except DataUnavailableError as err:
        Console().print(f"[yellow]skipped[/]: {err}")
        if options.json is not None:
            write_json_atomic(options.json, {"configs": options.config, "overrides": overrides, "skipped": {"bench": str(err)}})
        return 2
    if options.versus:
        return _bench_versus(options, overrides, precisions, devices[0], experiment, loader_batches)
    report = run_bench(
        experiment, devices, precisions, options.compile, options.warmup, options.steps, loader_batches, options.bare,
        options.memory, options.fallback_image_size, options.profile,
    )
    render_report(report, Console())
    if options.json is not None:
        write_json_atomic(options.json, report)
        Console().print(f"report written to {options.json}")
    return 0


def _bench_versus(
    options: argparse.Namespace,
    overrides: list[str],
    precisions: list[str],
    device: str,
    base: Experiment,
    loader_batches: int,
) -> int:
    """``--versus``: the other side built at the base's resolution and batch size, both timed in one run."""
    base_inputs = bench_inputs(base, loader_batches, options.bare, options.fallback_image_size, options.warmup, options.steps)
    try:
        other = load_experiment(
            options.versus, overrides, image_size=base_inputs.report["image_size"], batch_size=base.batch_size,
            loader_batches=loader_batches,
        )
    except DataUnavailableError as err:
        Console().print(f"[yellow]skipped[/]: --versus: {err}")
        if options.json is not None:
            skipped = {"configs": options.versus, "overrides": overrides, "skipped": {"bench": str(err)}}
            write_json_atomic(options.json, {**base_inputs.report, "versus": skipped})
        return 2
    other_inputs = bench_inputs(other, loader_batches, options.bare, options.fallback_image_size, options.warmup, options.steps)
    report = run_versus(
        base, base_inputs, other, other_inputs, device, precisions, options.compile, options.warmup, options.steps,
        options.bare, options.memory, options.profile,
    )
    console = Console()
    render_report(report, console)
    render_report(report["versus"], console)
    render_versus(report, console)
    if options.json is not None:
        write_json_atomic(options.json, report)
        console.print(f"report written to {options.json}")
    return 0
