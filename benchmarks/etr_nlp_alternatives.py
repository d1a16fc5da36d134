"""Alternatives to the operators that remain in ETR-NLP's CPU training step, timed against them.

After the fast paths of benchmarks/RESULTS.md, one task path of the NYUv2 SegNet spends about half
its step in matrix products near this core's best rate and half in memory-bound operators: the
frozen primitives, the stack of their responses and its backward copies, the sums of the input
gradients, max pooling, and the weight gradients of the mixes of two groups. This script times,
side by side (interleaved rounds, median), what could replace them with PyTorch's own CPU kernels:

1. ``responses``: the backward of an NLP block's responses (64 channels, 288x384, two runs of 32
   channels, the full-resolution layers) as autograd runs it (one copy of each response's gradient,
   the primitives' backwards, the sum of the five input gradients), against the same backward
   written by hand, reading the responses' gradient in place where a kernel accepts strides, or
   with oneDNN's fused "add" post-op for the depthwise convolutions; and each of those operators alone;
2. ``weight_gradients``: the weight gradients of the mixes of several groups in one task path's
   step (shapes recorded from the step) as ``torch.bmm``, against one dense copy per group and
   oneDNN's matrix product (what polytask runs from ``ONEDNN_GROUP_ROWS`` rows per group);
3. ``pooling``: the average primitive as a depthwise convolution divided by the count of valid pixels
   against ``avg_pool2d`` in channels-last memory; max pooling in channels-last against NCHW memory.

    python benchmarks/etr_nlp_alternatives.py                       # 288x384, 1 thread
    python benchmarks/etr_nlp_alternatives.py --repeats 5 --json alternatives.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from polytask.models.etr_nlp import nlp as nlp_module
from polytask.models.etr_nlp.nlp import _ONEDNN_LINEAR, ONEDNN_GROUP_ROWS, NLPBlock
from polytask.models.etr_nlp.primitives import FixedPool
from polytask.profiling.experiment import load_experiment
from polytask.profiling.timing import Variant, time_interleaved
from polytask.utils.host_memory import keep_freed_memory

CHANNELS_LAST = torch.channels_last
ADD_POST_OP = torch.ops.mkldnn._convolution_pointwise_.binary
MAX_POOL_BACKWARD = torch.ops.aten.max_pool2d_with_indices_backward


def interleaved_ms(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable: :func:`~polytask.profiling.timing.time_interleaved`, one
    warm-up call each, then ``repeats`` rounds of one call each, each round starting one callable later."""
    variants = [Variant(name, "fp32", False, "call", lambda: None, fn) for name, fn in candidates.items()]
    times, failed = time_interleaved(variants, 1, repeats, torch.device("cpu"))
    if failed:
        raise RuntimeError(f"candidates failed: {failed}")
    return {v.net: 1e3 * statistics.median(times[v.key]) for v in variants}


def responses_backward(image_size: Sequence[int], repeats: int) -> dict[str, Any]:
    """Experiment 1 of the module docstring: ``(B=1, 64, H, W)`` channels-last input, default primitives."""
    channels, (height, width) = 64, image_size
    block = NLPBlock(channels, 58, groups=2)
    block.response_run = 32
    local_binary, dilated, _, _, _ = block.primitives
    x = torch.randn(1, channels, height, width).contiguous(memory_format=CHANNELS_LAST).requires_grad_()
    grad = torch.randn_like(block.responses(x))
    k, run = len(block.primitives), block.response_run
    rows = grad.permute(0, 2, 3, 1).unflatten(3, (channels // run, k, run))

    def part(j: int) -> torch.Tensor:
        """Response ``j``'s gradient, a strided ``(1, C, H, W)`` view of ``grad``."""
        return rows[..., j, :].flatten(3).permute(0, 3, 1, 2)

    with torch.no_grad():
        _, indices = F.max_pool2d(x, 3, 1, 1, return_indices=True)
        count = F.conv2d(x.new_ones(1, 1, height, width), x.new_ones(1, 1, 3, 3), None, 1, 1)
    ones = x.new_ones(channels, 1, 3, 3)
    flipped = local_binary.weight.flip(-1, -2), dilated.weight.flip(-1, -2)

    def autograd_step() -> None:
        x.grad = None
        block.responses(x).backward(grad)

    def forward_only() -> None:
        with torch.no_grad():
            block.responses(x)

    def by_hand(in_place: bool, post_op: bool) -> torch.Tensor:
        """The input gradient, reading the slices in place (``in_place``) where a kernel takes strides;
        the depthwise convolutions' sums fused as oneDNN post-ops (``post_op``)."""
        dense = [part(j).contiguous(memory_format=CHANNELS_LAST) for j in (0, 1)]
        other = [part(j) if in_place else part(j).contiguous(memory_format=CHANNELS_LAST) for j in (2, 3, 4)]
        with torch.no_grad():
            total = F.conv2d(dense[0], flipped[0], None, 1, 1, 1, channels)
            average = other[0] / count
            if post_op:
                ADD_POST_OP(total, dense[1], flipped[1], None, [2, 2], [1, 1], [2, 2], channels, "add", 1.0, None, [], None)
                ADD_POST_OP(total, average, ones, None, [1, 1], [1, 1], [1, 1], channels, "add", 1.0, None, [], None)
            else:
                total += F.conv2d(dense[1], flipped[1], None, 1, 2, 2, channels)
                total += F.conv2d(average, ones, None, 1, 1, 1, channels)
            total += MAX_POOL_BACKWARD(other[1], x, [3, 3], [1, 1], [1, 1], [1, 1], False, indices)
            total += other[2]
        return total

    autograd_step()
    reference = x.grad
    for in_place, post_op in ((False, False), (True, False), (False, True)):
        torch.testing.assert_close(by_hand(in_place, post_op), reference, rtol=1e-4, atol=1e-4)
    whole = interleaved_ms(
        {
            "autograd forward + backward": autograd_step,
            "forward": forward_only,
            "by hand, dense copies": lambda: by_hand(False, False),
            "by hand, strided reads": lambda: by_hand(True, False),
            "by hand, oneDNN add post-op": lambda: by_hand(False, True),
        },
        repeats,
    )
    whole["autograd backward (difference)"] = whole["autograd forward + backward"] - whole["forward"]
    with torch.no_grad():
        dense, strided, total = part(0).contiguous(memory_format=CHANNELS_LAST), part(0), torch.zeros_like(x)
        operators = interleaved_ms(
            {
                "copy of one response's gradient": lambda: part(1).contiguous(memory_format=CHANNELS_LAST),
                "add_ of a dense gradient": lambda: total.add_(dense),
                "add_ of a strided gradient": lambda: total.add_(strided),
                "divide a strided gradient by the count": lambda: strided / count,
                "depthwise 3x3": lambda: F.conv2d(dense, flipped[0], None, 1, 1, 1, channels),
                "depthwise 3x3 with oneDNN add post-op": lambda: ADD_POST_OP(
                    total, dense, flipped[0], None, [1, 1], [1, 1], [1, 1], channels, "add", 1.0, None, [], None
                ),
                "depthwise 3x3, dilation 2": lambda: F.conv2d(dense, flipped[1], None, 1, 2, 2, channels),
                "depthwise 3x3, dilation 2, with oneDNN add post-op": lambda: ADD_POST_OP(
                    total, dense, flipped[1], None, [2, 2], [1, 1], [2, 2], channels, "add", 1.0, None, [], None
                ),
                "max-pool backward of a dense gradient": lambda: MAX_POOL_BACKWARD(
                    dense, x, [3, 3], [1, 1], [1, 1], [1, 1], False, indices
                ),
                "max-pool backward of a strided gradient": lambda: MAX_POOL_BACKWARD(
                    strided, x, [3, 3], [1, 1], [1, 1], [1, 1], False, indices
                ),
            },
            repeats,
        )
    return {"shape": [1, channels, height, width], "whole_ms": whole, "operators_ms": operators}


def weight_gradients(image_size: Sequence[int], repeats: int) -> dict[str, Any]:
    """Experiment 2 of the module docstring: the weight gradients of the mixes of several groups in one
    task path's training step of the NYUv2 ETR-NLP SegNet, their shapes recorded from the step."""
    net = load_experiment(["configs/etr_nlp_nyuv2.yaml"], image_size=image_size, batch_size=1).module.net.train()
    images = torch.randn(1, 3, *image_size)
    shapes: Counter[tuple[int, int, int, int]] = Counter()
    weight_grad = nlp_module._weight_grad

    def recording(grad_rows: torch.Tensor, x_rows: torch.Tensor) -> torch.Tensor:
        (p, g, o), i = grad_rows.shape, x_rows.shape[2]
        if g > 1:
            shapes[(g, o, p, i)] += 1
        return weight_grad(grad_rows, x_rows)

    nlp_module._weight_grad = recording
    try:
        net.forward_task(images, net.task_names[0]).float().pow(2).mean().backward()
    finally:
        nlp_module._weight_grad = weight_grad
    rows = []
    for (g, o, p, i), calls in sorted(shapes.items(), key=lambda kv: -kv[0][2] * kv[0][1] * kv[0][3]):
        grad_rows = torch.randn(p, g * o).view(p, g, o)
        x_rows = torch.randn(p, g * i).view(p, g, i)
        bmm = functools.partial(torch.bmm, grad_rows.permute(1, 2, 0), x_rows.permute(1, 0, 2))

        def dense_onednn(grad_rows: torch.Tensor = grad_rows, x_rows: torch.Tensor = x_rows) -> torch.Tensor:
            return torch.stack(
                [
                    _ONEDNN_LINEAR(grad_rows[:, j].contiguous().t(), x_rows[:, j].contiguous().t(), None, "none", [], "")
                    for j in range(grad_rows.shape[1])
                ]
            )

        torch.testing.assert_close(dense_onednn(), bmm(), rtol=1e-3, atol=1e-2)
        ms = interleaved_ms({"bmm": bmm, "dense_onednn": dense_onednn}, repeats)
        rows.append({"groups": g, "rows": o, "pixels": p, "columns": i, "calls": calls, **{f"{k}_ms": v for k, v in ms.items()}})
    return {
        "calls": rows,
        "bmm_ms": sum(r["calls"] * r["bmm_ms"] for r in rows),
        "dense_onednn_ms": sum(r["calls"] * r["dense_onednn_ms"] for r in rows),
        "polytask_ms": sum(r["calls"] * r[f"{'dense_onednn' if r['rows'] >= ONEDNN_GROUP_ROWS else 'bmm'}_ms"] for r in rows),
    }


def pooling(image_size: Sequence[int], repeats: int) -> dict[str, Any]:
    """Experiment 3 of the module docstring, forward and backward, at the full and half image size."""
    height, width = image_size
    out: dict[str, Any] = {}
    for channels, (h, w) in ((3, (height, width)), (64, (height, width)), (128, (height // 2, width // 2))):
        x = torch.randn(1, channels, h, w).contiguous(memory_format=CHANNELS_LAST).requires_grad_()
        x_nchw = x.detach().contiguous().requires_grad_()
        average = FixedPool("avg")
        grad = torch.randn_like(x)

        def step(fn: Callable[[torch.Tensor], torch.Tensor], inp: torch.Tensor, grad: torch.Tensor = grad) -> Callable[[], None]:
            def run() -> None:
                inp.grad = None
                fn(inp).backward(grad)

            return run

        out[f"{channels}x{h}x{w}"] = interleaved_ms(
            {
                "average: depthwise convolution / count": step(average, x),
                "average: avg_pool2d, channels-last": step(lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False), x),
                "max: channels-last": step(lambda t: F.max_pool2d(t, 3, 1, 1), x),
                "max: NCHW": step(lambda t: F.max_pool2d(t, 3, 1, 1), x_nchw),
            },
            repeats,
        )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, nargs=2, default=[288, 384], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per experiment (median), after one warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if _ONEDNN_LINEAR is None:
        parser.error("this script compares oneDNN kernels; this PyTorch build has no oneDNN")
    host_malloc = keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {
        "image_size": args.image_size,
        "threads": args.threads,
        "host_malloc": host_malloc,
        "responses": responses_backward(args.image_size, args.repeats),
        "weight_gradients": weight_gradients(args.image_size, args.repeats),
        "pooling": pooling(args.image_size, args.repeats),
    }
    responses = results["responses"]
    print(f"1. responses backward, {responses['shape']} (ms):")
    for name, ms in {**responses["whole_ms"], **responses["operators_ms"]}.items():
        print(f"   {name:55s} {ms:8.2f}")
    grads = results["weight_gradients"]
    print("2. the weight gradients of the mixes of several groups in one task path (ms per call; g, O, P, I, calls):")
    for row in grads["calls"]:
        print(
            f"   {row['groups']} {row['rows']:4d} {row['pixels']:7d} {row['columns']:5d} x{row['calls']}"
            f"   bmm {row['bmm_ms']:7.2f}   dense oneDNN {row['dense_onednn_ms']:7.2f}"
        )
    print(
        f"   whole path: bmm {grads['bmm_ms']:.1f} ms, dense oneDNN {grads['dense_onednn_ms']:.1f} ms, "
        f"polytask's choice (oneDNN from {ONEDNN_GROUP_ROWS} rows per group) {grads['polytask_ms']:.1f} ms"
    )
    print("3. pooling, forward + backward (ms):")
    for shape, row in results["pooling"].items():
        print(f"   {shape}: " + ", ".join(f"{name} {ms:.2f}" for name, ms in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
