"""The least time ETR-NLP's all-task training step can take on this machine, against hard sharing's step.

ETR-NLP's task paths share no computation after their first routed layer (each layer's shared
branch reads the previous layer's task-dependent output), so an all-task training step runs T full
trunk passes. Each pass spends most of its multiply-adds in the NLP blocks' 1x1 mixes, which
recombine k = 5 frozen responses per input channel; they run as matrix products. This script

1. counts the floating-point operations of every matrix product of one task path's training step
   (forward of one task, backward of its output's mean square), exactly, from the operators the
   step dispatches (the mixes' oneDNN 1x1 convolutions and oneDNN weight-gradient products included), and times them;
2. measures the best rate of this core at matrix products (and, for comparison, at hard sharing's
   3x3 convolutions);
3. times hard sharing's whole training step (all T heads) and the T heads' share of it;
4. prints the floor ``(T x path product FLOPs / best rate + heads) / hard sharing's step``: what
   ETR-NLP's step would cost if its products ran at the core's best matrix-product rate and every
   primitive, normalisation, pooling and copy were free.

    python benchmarks/etr_nlp_floor.py                              # NYUv2 SegNet, 288x384, batch 1, 1 thread
    python benchmarks/etr_nlp_floor.py --image-size 144 192 --repeats 5 --json floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from polytask.models.summary import onednn_convolution_flops
from polytask.profiling.experiment import load_experiment
from polytask.utils.host_memory import keep_freed_memory

ETR_NLP = ["configs/etr_nlp_nyuv2.yaml"]
HARD_SHARING = ["configs/etr_nlp_nyuv2.yaml", "configs/etr_nlp_baseline_hard_sharing_segnet.yaml"]
ONEDNN_MIX = torch.ops.mkldnn._convolution_pointwise.default
ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default
MATRIX_PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default}
PRODUCTS = {*MATRIX_PRODUCTS, ONEDNN_MIX, ONEDNN_LINEAR}


def product_flops(func: Any, args: Sequence[Any], out: torch.Tensor) -> int:
    """Floating-point operations (2 per multiply-add) of one matrix-product call (PyTorch's FLOP
    formulas), of one of the mixes' oneDNN 1x1 convolutions (the only ``mkldnn::_convolution_pointwise`` calls
    made directly; the primitives' convolutions dispatch as ``convolution``), or of one of their
    weight gradients as oneDNN's matrix product (``mkldnn::_linear_pointwise``: ``(M, K)`` by ``(N, K)``)."""
    if func is ONEDNN_MIX:
        return onednn_convolution_flops(args[0].shape, args[1].shape, out_shape=out.shape)
    if func is ONEDNN_LINEAR:
        return flop_registry[torch.ops.aten.mm](args[0], args[1].t(), out_val=out)
    return flop_registry[func.overloadpacket](*args, out_val=out)


class ProductCounter(TorchDispatchMode):
    """Counts the FLOPs and the wall time of the matrix products dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.seconds = 0.0
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func not in PRODUCTS:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - start
        self.flops += product_flops(func, args, out)
        self.calls[func.__name__] += 1
        return out


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``step`` over ``repeats`` calls after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rates(image_size: Sequence[int], repeats: int) -> dict[str, float]:
    """GFLOP/s of this core on matrix products (a square one; the largest mix of the NYUv2 SegNet as a
    oneDNN 1x1 convolution in channels-last memory) and, for comparison, on a 3x3 convolution of 64
    channels at ``image_size`` (oneDNN's direct kernel, what hard sharing's layers run)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mix_x = torch.randn(1, 2560, 36, 48).contiguous(memory_format=torch.channels_last)
    mix_w = torch.randn(512, 2560, 1, 1)
    x, w = torch.randn(1, 64, *image_size), torch.randn(64, 64, 3, 3)
    return {
        "matmul_2048": 2 * 2048**3 / median_seconds(lambda: a @ b, repeats) / 1e9,
        "conv1x1_2560_512": 2 * 2560 * 512 * 36 * 48 / median_seconds(
            lambda: ONEDNN_MIX(mix_x, mix_w, None, [0, 0], [1, 1], [1, 1], 1, "none", [], ""), repeats) / 1e9,
        "conv3x3_64": 2 * 64 * 64 * 9 * image_size[0] * image_size[1] / median_seconds(
            lambda: F.conv2d(x, w, padding=1), repeats) / 1e9,
    }


def training_step(net: torch.nn.Module, images: torch.Tensor, task: str | None) -> Callable[[], None]:
    """One training step of ``net``: all tasks (``task=None``) or one task path, loss = sum of the outputs' mean squares."""

    def step() -> None:
        net.zero_grad(set_to_none=True)
        outputs = net(images) if task is None else {task: net.forward_task(images, task)}
        sum(o.float().pow(2).mean() for o in outputs.values()).backward()

    return step


def heads_step(net: torch.nn.Module, features: torch.Tensor, size: Sequence[int]) -> Callable[[], None]:
    """Forward and backward of every head of ``net`` on the trunk's output ``features``."""
    features = features.detach().requires_grad_()

    def step() -> None:
        net.zero_grad(set_to_none=True)
        sum(head(features, size).float().pow(2).mean() for head in net.heads.values()).backward()

    return step


def measure(image_size: Sequence[int], batch_size: int, repeats: int, host_malloc: str) -> dict[str, Any]:
    """The counts, times and floor of the module docstring (``host_malloc``: what :func:`keep_freed_memory` returned)."""
    nets = {}
    for name, configs in (("etr_nlp", ETR_NLP), ("hard_sharing", HARD_SHARING)):
        experiment = load_experiment(configs, image_size=image_size, batch_size=batch_size)
        nets[name] = experiment.module.net.train()
    etr, hs = nets["etr_nlp"], nets["hard_sharing"]
    images = torch.randn(batch_size, 3, *image_size)
    task = etr.task_names[0]
    path = training_step(etr, images, task)
    path()
    counter = ProductCounter()
    with counter:
        path()
    with torch.no_grad():
        features = hs.trunk(images)
    times = {
        "etr_nlp_path_step_s": median_seconds(path, repeats),
        "hard_sharing_step_s": median_seconds(training_step(hs, images, None), repeats),
        "heads_step_s": median_seconds(heads_step(hs, features, image_size), repeats),
    }
    peaks = peak_rates(image_size, repeats)
    best = max(peaks["matmul_2048"], peaks["conv1x1_2560_512"])
    num_tasks = len(etr.task_names)
    products_floor = num_tasks * counter.flops / (best * 1e9)
    floor = (products_floor + times["heads_step_s"]) / times["hard_sharing_step_s"]
    return {
        "image_size": list(image_size), "batch_size": batch_size, "tasks": num_tasks, "threads": torch.get_num_threads(),
        "host_malloc": host_malloc,
        "path_product_gflop": counter.flops / 1e9, "path_product_s_counted": counter.seconds,
        "path_product_gflops_rate": counter.flops / counter.seconds / 1e9, "path_product_calls": dict(counter.calls),
        **times, "peak_gflops": peaks,
        "floor_products_s": products_floor,
        "floor_over_hard_sharing": floor,
        "measured_paths_over_hard_sharing": num_tasks * times["etr_nlp_path_step_s"] / times["hard_sharing_step_s"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, nargs=2, default=[288, 384], metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median), after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args(argv)
    host_malloc = keep_freed_memory()
    torch.set_num_threads(options.threads)
    torch.manual_seed(0)
    row = measure(options.image_size, options.batch_size, options.repeats, host_malloc)
    print(
        f"ETR-NLP vs hard sharing, NYUv2 SegNet {row['image_size'][0]}x{row['image_size'][1]}, batch {row['batch_size']}, "
        f"T = {row['tasks']}, {row['threads']} thread(s), host malloc: {row['host_malloc']}\n"
        f"  one task path's training step: {row['path_product_gflop']:.1f} GFLOP in matrix products "
        f"({row['path_product_s_counted']:.2f} s, {row['path_product_gflops_rate']:.0f} GFLOP/s), "
        f"{row['etr_nlp_path_step_s']:.2f} s in all\n"
        "  rates of this core: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in row["peak_gflops"].items()) + "\n"
        f"  hard sharing's training step: {row['hard_sharing_step_s']:.2f} s, of which its {row['tasks']} heads "
        f"{row['heads_step_s']:.2f} s (the same heads as ETR-NLP's)\n"
        f"  floor of ETR-NLP's step: T x products at the best matrix-product rate {row['floor_products_s']:.2f} s + heads "
        f"= {row['floor_over_hard_sharing']:.2f}x hard sharing's step\n"
        f"  measured: T x one path's step = {row['measured_paths_over_hard_sharing']:.2f}x hard sharing's step"
    )
    if options.json:
        with open(options.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
