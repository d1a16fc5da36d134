"""Learnable parameters and FLOPs of ETR-NLP vs its baselines, and the batched all-task speed-up.

For every ETR-NLP setting (the networks of its configs, with the baseline overlays
``configs/etr_nlp_baseline_*`` or the quick baseline configs) the table gives the learnable
parameters, the FLOPs of one task's path (``forward_task``: the trunk path of that task and its
head, averaged over the tasks) and the FLOPs of the all-task forward, counted by
:func:`polytask.models.summary.count_flops` (torch's FlopCounterMode, 2 FLOPs per multiply-add, one
image) on the meta device. The speed-up section times the batched all-task forward against ``T``
per-task forwards on this machine (median of interleaved repetitions).

    python benchmarks/etr_nlp_report.py --out /tmp/etr_nlp_report.md
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from polytask.data.datasets.celeba import ATTRIBUTE_GROUPS
from polytask.data.datasets.mtan import CITYSCAPES_7_CLASSES, NYUV2_CLASSES, segmentation_tasks
from polytask.models.base import MultiTaskNet
from polytask.models.summary import count_flops
from polytask.tasks import Task, build_task

METHODS: tuple[str, ...] = ("etr_nlp", "hard_sharing", "single_task")
TASK_BRANCH_CONV = "configs/etr_nlp_ablation_task_branch_conv.yaml"


def celeba_tasks() -> list[Task]:
    """The 8 CelebA attribute groups (attributes named by their column index)."""
    return [build_task("attributes", name=g, attribute_names=[str(i) for i in cols]) for g, cols in ATTRIBUTE_GROUPS.items()]


def mtan_tasks(class_names: Sequence[str], split: str, normals: bool) -> list[Task]:
    """Segmentation tasks of ``split`` (multiclass or binary), depth, and normals for NYUv2."""
    return [*segmentation_tasks(class_names, split), build_task("depth"), *([build_task("normals")] if normals else [])]


def config_tasks(config: str) -> list[Task]:
    """Tasks of a config's datamodule (built from its ``data`` section; loads no data)."""
    data = yaml.safe_load(Path(config).read_text())["data"]
    return load_class(data["class_path"])(**data.get("init_args", {})).tasks


def config_image_size(config: str) -> tuple[int, int]:
    """``(H, W)`` of the images of a quick config (digit pairs or SynthScenes)."""
    args = yaml.safe_load(Path(config).read_text())["data"]["init_args"]
    if "scale" in args:
        return 8 * args["scale"], 16 * args["scale"]
    return tuple(args["image_size"])  # type: ignore[return-value]


@dataclass
class Setting:
    """One dataset setting: its tasks, image size, the config(s) of each method, and whether the speed-up is timed."""

    name: str
    tasks: Callable[[], list[Task]]
    image_size: tuple[int, int]
    configs: dict[str, list[str]]
    timed: bool = False


def paper_setting(
    name: str, base: str, skeleton: str, tasks: Callable[[], list[Task]], size: tuple[int, int],
    extra: Sequence[str] = (), timed: bool = False, task_routing: str = "",
) -> Setting:
    """A paper setting: its ETR-NLP config(s) (both task branches), and the same with the baseline overlays."""
    configs = {"etr_nlp": [base, *extra], "etr_nlp (conv task branch)": [base, *extra, TASK_BRANCH_CONV]}
    for method in ("etr", "nlp", "task_routing", *METHODS[1:]):
        overlay = f"configs/etr_nlp_baseline_{method}_{skeleton}{task_routing if method == 'task_routing' else ''}.yaml"
        configs[method] = [base, *extra, overlay]
    return Setting(name, tasks, size, configs, timed)


def quick_setting(name: str, configs: dict[str, str]) -> Setting:
    """A quick setting: one full config per method (timed), and ETR-NLP with the conv task branch."""
    first = configs["etr_nlp"]
    layered = {m: [c] for m, c in configs.items()}
    layered = {"etr_nlp": [first], "etr_nlp (conv task branch)": [first, TASK_BRANCH_CONV], **layered}
    return Setting(name, lambda: config_tasks(first), config_image_size(first), layered, True)


SETTINGS: tuple[Setting, ...] = (
    paper_setting("CelebA ResNet-18 (8 groups)", "configs/etr_nlp_celeba.yaml", "resnet18", celeba_tasks, (64, 78), timed=True),
    paper_setting(
        "NYUv2 SegNet multiclass", "configs/etr_nlp_nyuv2.yaml", "segnet",
        lambda: mtan_tasks(NYUV2_CLASSES, "multiclass", True), (288, 384), task_routing="_nyuv2",
    ),
    paper_setting(
        "NYUv2 SegNet binary", "configs/etr_nlp_nyuv2.yaml", "segnet",
        lambda: mtan_tasks(NYUV2_CLASSES, "binary", True), (288, 384), ["configs/etr_nlp_nyuv2_binary.yaml"],
        task_routing="_nyuv2",
    ),
    paper_setting(
        "Cityscapes SegNet multiclass", "configs/etr_nlp_cityscapes.yaml", "segnet",
        lambda: mtan_tasks(CITYSCAPES_7_CLASSES, "multiclass", False), (128, 256), task_routing="_cityscapes",
    ),
    paper_setting(
        "Cityscapes SegNet binary", "configs/etr_nlp_cityscapes.yaml", "segnet",
        lambda: mtan_tasks(CITYSCAPES_7_CLASSES, "binary", False), (128, 256), ["configs/etr_nlp_cityscapes_binary.yaml"],
        task_routing="_cityscapes",
    ),
    quick_setting("digits (quick)", {m: f"configs/{m}_digits.yaml" for m in METHODS}),
    quick_setting(
        "SynthScenes (quick)",
        {
            "etr_nlp": "configs/etr_nlp_synthscenes.yaml",
            "hard_sharing": "configs/hard_sharing_synthscenes_etr.yaml",
            "single_task": "configs/single_task_synthscenes_etr.yaml",
        },
    ),
)


def load_class(path: str) -> Any:
    """The object at a dotted import path."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def net_spec(configs: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``model.net`` class path and init args after layering ``configs`` (later ones override)."""
    class_path, init_args = "", {}
    for config in configs:
        net = (yaml.safe_load(Path(config).read_text()).get("model") or {}).get("net") or {}
        class_path = net.get("class_path", class_path)
        init_args.update(net.get("init_args") or {})
    return class_path, init_args


def build_net(configs: Sequence[str], tasks: Sequence[Task]) -> MultiTaskNet:
    """The network of layered ``configs`` for ``tasks``."""
    class_path, init_args = net_spec(configs)
    return load_class(class_path)(tasks, **init_args)


class TaskPath(nn.Module):
    """One task's output through the network's per-task mode: ``(B, 3, H, W)`` -> that task's output.

    Args:
        net: a network with ``forward_task``.
        task: the task name.
    """

    def __init__(self, net: nn.Module, task: str) -> None:
        super().__init__()
        self.net = net
        self.task = task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_task(images, self.task)


@dataclass
class Counts:
    """Learnable parameters, frozen weights and FLOPs (one image) of one network."""

    params: int
    frozen: int
    task_flops: float
    all_flops: float


BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def count(net: MultiTaskNet, image_size: tuple[int, int]) -> Counts:
    """Parameters, frozen buffer elements (primitive weights, masks; not batch-norm statistics),
    mean per-task-path FLOPs and all-task FLOPs, counted on the meta device."""
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(b.numel() for name, b in net.named_buffers() if not name.endswith(BN_STATISTICS))
    meta = net.to("meta")
    task_flops = statistics.fmean(count_flops(TaskPath(meta, name), image_size) for name in net.task_names)
    return Counts(params, frozen, task_flops, count_flops(meta, image_size))


def counts_table() -> list[str]:
    """Markdown table of parameters and FLOPs of every setting and method."""
    lines = [
        "| setting | T | image | method | learnable params | vs hard sharing | frozen | GFLOPs one task | vs hard sharing "
        "| GFLOPs all tasks | vs hard sharing |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in SETTINGS:
        tasks = setting.tasks()
        counts = {m: count(build_net(configs, tasks), setting.image_size) for m, configs in setting.configs.items()}
        hs = counts["hard_sharing"]
        for method, c in counts.items():
            lines.append(
                f"| {setting.name} | {len(tasks)} | {setting.image_size[0]}x{setting.image_size[1]} | {method} "
                f"| {c.params:,} | {c.params / hs.params:.2f}x | {c.frozen:,} | {c.task_flops / 1e9:.4g} "
                f"| {c.task_flops / hs.task_flops:.2f}x "
                f"| {c.all_flops / 1e9:.4g} | {c.all_flops / hs.all_flops:.2f}x |"
            )
    return lines


def median_seconds(fn: Callable[[], object], other: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall times of ``fn`` and ``other``, measured alternately after one warm-up each."""
    fn(), other()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for record, f in zip(times, (fn, other)):
            start = time.perf_counter()
            f()
            record.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def speedup_rows(setting: Setting, batch_sizes: Sequence[int], reps: int) -> list[str]:
    """Batched all-task forward vs ``T`` per-task forwards (inference) and one training step, per batch size."""
    tasks = setting.tasks()
    net = build_net(setting.configs["etr_nlp"], tasks)
    names = net.task_names
    rows = []
    for batch in batch_sizes:
        images = torch.randn(batch, 3, *setting.image_size)

        def infer_batched() -> object:
            with torch.no_grad():
                return net.eval()(images)

        def infer_per_task() -> object:
            with torch.no_grad():
                return [net.eval().forward_task(images, n) for n in names]

        def train_batched() -> None:
            net.train().zero_grad()
            sum(o.float().square().mean() for o in net(images).values()).backward()

        def train_per_task() -> None:
            net.train().zero_grad()
            sum(net.forward_task(images, n).float().square().mean() for n in names).backward()

        modes = (("inference", infer_batched, infer_per_task), ("train fwd+bwd", train_batched, train_per_task))
        for mode, batched, per_task in modes:
            t_batched, t_per_task = median_seconds(batched, per_task, reps)
            rows.append(
                f"| {setting.name} | {len(tasks)} | {mode} | {batch} | {t_batched * 1e3:.1f} | {t_per_task * 1e3:.1f} "
                f"| {t_per_task / t_batched:.2f}x |"
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print (and optionally write) the parameter/FLOP table and the speed-up table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each mode")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--skip-speed", action="store_true", help="only the parameter/FLOP table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        "## ETR-NLP: learnable parameters and FLOPs (one image)",
        "",
        "`python benchmarks/etr_nlp_report.py`; FLOPs by torch's FlopCounterMode (2 per multiply-add; convolutions and "
        "matrix products only, pooling and normalisation are not counted). \"one task\": the path of one task "
        "(`forward_task`), mean over the tasks; for the shared networks this is the shared trunk plus one head. "
        "\"all tasks\": `forward`, the batched all-task pass for ETR-NLP and single-task.",
        "",
        *counts_table(),
    ]
    if not args.skip_speed:
        lines += [
            "",
            f"## Batched all-task forward vs T per-task forwards ({os.cpu_count()} CPU cores, {args.threads} torch threads, "
            f"median of {args.reps} interleaved repetitions, load average {os.getloadavg()[0]:.1f} at the start)",
            "",
            "| setting | T | mode | batch | batched ms | T per-task ms | speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for setting in SETTINGS:
            if setting.timed:
                lines += speedup_rows(setting, args.batch_sizes, args.reps)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
