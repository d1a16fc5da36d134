"""The batch a benchmark runs on (the loader's first batch, or random images and targets) and the report's head."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from polytask.models.summary import summarize_model
from polytask.profiling.bare import make_bare_net
from polytask.profiling.experiment import Experiment
from polytask.profiling.loader import LoaderStats, measure_loader
from polytask.tasks import Task


def synthetic_batch(tasks: Sequence[Task], batch_size: int, image_size: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Random images ``(B, 3, H, W)`` and each task's :meth:`~polytask.tasks.Task.random_target`
    ``(B, ...)`` for ``tasks``, all drawn in order from one generator seeded with 0."""
    generator = torch.Generator().manual_seed(0)
    b, (h, w) = batch_size, (int(image_size[0]), int(image_size[1]))
    batch: dict[str, torch.Tensor] = {"image": torch.randn(b, 3, h, w, generator=generator)}
    for task in tasks:
        batch[task.name] = task.random_target(b, (h, w), generator)
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
        "model": net.display_name,
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
