"""Stacked vs looped task paths of a routed network's all-task forward, on this machine.

A task-routed network (ETR-NLP, ETR, Task Routing, single-task) runs the paths of its T tasks
either in one call on a T-times larger stacked batch (``task_batching: stacked``) or in T calls,
one per task (``loop``); both give the same outputs and gradients. This script times the two side
by side (interleaved rounds, median of ``--repeats``) for a grid of image sizes, for a training
step (forward, backward of the sum of the outputs' mean squares) and for inference, and prints
loop / stacked time ratios (below 1: the loop is faster), with the size of the first layer's
stacked output that the ``auto`` rule reads. The rule of
:func:`polytask.models.etr_nlp.choose_task_batching` comes from these figures
(benchmarks/RESULTS.md, "ETR-NLP: stacked or looped task paths").

    python benchmarks/etr_nlp_task_batching.py                     # SynthScenes SegNet widths
    python benchmarks/etr_nlp_task_batching.py --filters 64 128 256 512 512 --sizes 2x96x128 2x144x192
    python benchmarks/etr_nlp_task_batching.py --arch resnet18 --tasks 8 --sizes 8x64x78 32x64x78  # CelebA-like
    python benchmarks/etr_nlp_task_batching.py --json out.json --markdown out.md
    python benchmarks/etr_nlp_task_batching.py --device cuda     # what benchmarks/gpu_check.sh runs

A size is ``BxHxW`` (batch, height, width).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence

import torch

from polytask.models.etr_nlp import (
    LOOP_ABOVE_ELEMENTS,
    RoutedNet,
    RoutedResNet,
    RoutedSegNet,
    choose_task_batching,
    stacked_first_layer_elements,
)
from polytask.profiling.timing import Variant, time_interleaved
from polytask.tasks import build_task
from polytask.utils.host_memory import keep_freed_memory

TASKS = ("semseg", "depth", "normals", "sal", "edge", "human_parts")
MODES = ("stacked", "loop")


def parse_size(text: str) -> tuple[int, int, int]:
    """``"8x64x64"`` -> ``(8, 64, 64)``."""
    try:
        batch, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a size is BxHxW, e.g. 8x64x64; got {text!r}") from err
    return batch, height, width


def _variants(net: RoutedNet, images: torch.Tensor) -> list[Variant]:
    """A training step and an inference call in each mode (the mode is set before each call)."""

    def set_mode(mode: str) -> Callable[[], None]:
        def prepare() -> None:
            net.task_batching = mode
            net.zero_grad(set_to_none=True)

        return prepare

    def train() -> None:
        loss = sum(out.float().pow(2).mean() for out in net.train()(images).values())
        loss.backward()

    def infer() -> None:
        with torch.inference_mode():
            net.eval()(images)

    return [
        Variant(mode, "fp32", False, phase, set_mode(mode), run)
        for mode in MODES
        for phase, run in (("train", train), ("infer", infer))
    ]


def build_net(arch: str, filters: Sequence[int], num_tasks: int) -> RoutedNet:
    """ETR-NLP ``segnet`` (dense SynthScenes tasks, stage widths ``filters``) or ``resnet18`` (CelebA-like
    attribute groups of 5 attributes each)."""
    torch.manual_seed(0)
    if arch == "resnet18":
        groups = [build_task("attributes", name=f"group{i}", attribute_names=[f"a{j}" for j in range(5)]) for i in range(num_tasks)]
        return RoutedResNet(groups, routing="etr_nlp")
    tasks = [build_task(name, **({"num_classes": 7} if name in ("semseg", "human_parts") else {})) for name in TASKS[:num_tasks]]
    return RoutedSegNet(tasks, filters=tuple(filters), routing="etr_nlp")


def measure(
    net: RoutedNet, size: tuple[int, int, int], warmup: int, repeats: int, device: torch.device
) -> dict:
    """Median seconds per call of both modes, training and inference, on ``device``, and the loop / stacked ratios."""
    batch, height, width = size
    num_tasks = len(net.task_names)
    net = net.to(device)
    images = torch.randn(batch, 3, height, width, device=device)
    times, failed = time_interleaved(_variants(net, images), warmup, repeats, device)
    if failed:
        raise RuntimeError(f"variants failed: {failed}")
    median = {key: statistics.median(values) for key, values in times.items()}
    row = {
        "tasks": num_tasks, "batch": batch, "height": height, "width": width,
        "elements": stacked_first_layer_elements(images.shape, num_tasks, net.first_layer),
        "auto_train": choose_task_batching("auto", images, num_tasks, net.first_layer), "median_s": median,
    }
    for phase in ("train", "infer"):
        row[f"loop_over_stacked/{phase}"] = median[f"loop/fp32/eager/{phase}"] / median[f"stacked/fp32/eager/{phase}"]
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("segnet", "resnet18"), default="segnet", help="routed architecture")
    parser.add_argument("--filters", type=int, nargs=5, default=[8, 16, 16, 32, 32], help="SegNet stage widths")
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 6], help="numbers of tasks (T)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in ("8x32x32", "8x48x48", "8x64x64", "8x96x96", "8x128x128")])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--markdown", default=None, help="also write the printed table to this file")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the polytask command does (polytask.utils.host_memory)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU thread(s)"
    arch = f"SegNet filters {args.filters}" if args.arch == "segnet" else "ResNet-18"
    rule = f"`auto` loops in CPU training steps above {LOOP_ABOVE_ELEMENTS:,} elements in the first layer's stacked output"
    lines = [
        f"{arch}, {where}, fp32; {rule}",
        "",
        "| T | batch x H x W | first stacked output (elements) | loop / stacked train | loop / stacked infer | stacked train ms | auto, training |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    for num_tasks in args.tasks:
        for size in args.sizes:
            row = measure(build_net(args.arch, args.filters, num_tasks), size, args.warmup, args.repeats, device)
            rows.append(row)
            lines.append(
                f"| {num_tasks} | {size[0]}x{size[1]}x{size[2]} | {row['elements']:,} | {row['loop_over_stacked/train']:.2f} "
                f"| {row['loop_over_stacked/infer']:.2f} | {1e3 * row['median_s']['stacked/fp32/eager/train']:.0f} | {row['auto_train']} |"
            )
            print(lines[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "filters": args.filters, "device": str(device), "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
