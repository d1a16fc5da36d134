"""Training-step cost of TaskExpert relative to its bare ViT backbone with a plain head.

Both networks use the same timm ViT (default ViT-S/16, random weights) on the same batch and
the five PASCAL-Context tasks. The reference ("bare") network reads the last block's tokens
(with the final norm) and predicts every task with one Conv1x1 followed by bilinear upsampling
to the input size. One training step is forward + backward of the sum of the outputs' mean
squares + an Adam step (under CPU/CUDA bf16 autocast for ``bf16``). All networks and precisions
are timed interleaved (round-robin over precisions and networks after warm-up, each round starting
one later), and the script reports per TaskExpert variant and precision the median step time and
the ratios to the bare network of the same precision, for the wall clock and for the process's
CPU time (the CPU time leaves out waiting for a core, which dominates the scatter on a machine
shared with other jobs). Results and the commands behind them: benchmarks/RESULTS.md.

    python benchmarks/taskexpert_overhead.py                       # TaskExpert's default heads, fp32
    python benchmarks/taskexpert_overhead.py --head-scale 1        # heads on the token grid
    python benchmarks/taskexpert_overhead.py --precision fp32 bf16 \\
        --variant head=bilinear,head_channels=128,head_scale=4 --variant head=project,head_channels=44
    python benchmarks/taskexpert_overhead.py --profile             # which operators the extra time goes to

A variant is ``key=value`` pairs of TaskExpert options (``head``, ``head_channels``, ``head_scale``,
``width``, ``num_experts``, ``expert``...) on top of the command's ``--experts``, ``--width``,
``--head``, ``--head-channels`` and ``--head-scale``; without ``--variant`` the command line's own
options are the one variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from polytask.models.backbones import create_timm_model
from polytask.models.summary import flop_counter
from polytask.models.taskexpert import TaskExpert
from polytask.tasks import Task, build_task
from polytask.utils.host_memory import keep_freed_memory

PRECISIONS = ("fp32", "bf16")
CLOCKS = {"wall": 0, "cpu": 1}
"""The two clocks of :func:`timed` and their index in its result."""


def pascal_tasks() -> list[Task]:
    """The five PASCAL-Context tasks (class counts of PASCAL_MT)."""
    return [
        build_task("semseg", num_classes=21),
        build_task("human_parts", num_classes=7),
        build_task("sal"),
        build_task("normals"),
        build_task("edge"),
    ]


class BareViT(nn.Module):
    """A timm ViT's last-block tokens -> one Conv1x1 per task -> bilinear to the input size.

    Args:
        tasks: the dense tasks to predict.
        backbone: timm ViT name.
        img_size: input resolution ``(H, W)``.
    """

    def __init__(self, tasks: Sequence[Task], backbone: str, img_size: tuple[int, int]) -> None:
        super().__init__()
        self.vit = create_timm_model(backbone, pretrained=False, img_size=img_size, num_classes=0)
        channels = int(self.vit.embed_dim)
        self.heads = nn.ModuleDict({t.name: nn.Conv2d(channels, t.out_channels, 1) for t in tasks})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{task: (B, C_t, H, W)}``."""
        tokens = self.vit.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)[0]
        size = images.shape[-2:]
        return {name: F.interpolate(head(tokens), size=size, mode="bilinear", align_corners=False)
                for name, head in self.heads.items()}


def make_step(net: nn.Module, images: torch.Tensor, precision: str = "fp32") -> Callable[[], None]:
    """A closure running one training step (forward, backward, Adam) of ``net`` on ``images``.

    ``bf16`` runs the forward and the loss under bf16 autocast (the parameters and Adam stay fp32).
    """
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-5)

    def autocast() -> contextlib.AbstractContextManager:
        if precision == "bf16":
            return torch.autocast(images.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> None:
        with autocast():
            out = net(images)
            loss = sum(o.float().square().mean() for o in out.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step: Callable[[], None], steps: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds per call of ``step`` over ``steps`` calls.

    The CPU time is this process's (all its threads); on a machine shared with other jobs it leaves
    out the time the process waits for a core, which the wall time includes.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def self_times(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Self CPU milliseconds per call of ``step`` by operator, from ``torch.profiler`` over ``steps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {event.key: event.self_cpu_time_total / 1e3 / steps for event in prof.key_averages()}


def print_profile_difference(bare_step: Callable[[], None], expert_step: Callable[[], None], calls: int,
                             rows: int = 12) -> None:
    """Print the operators whose self CPU time per step grows most from the bare network to TaskExpert."""
    bare, expert = self_times(bare_step, calls), self_times(expert_step, calls)
    print(f"profiled step: bare {sum(bare.values()):.0f} ms, taskexpert {sum(expert.values()):.0f} ms (self CPU)")
    growth = sorted(((expert.get(k, 0.0) - bare.get(k, 0.0), k) for k in set(bare) | set(expert)), reverse=True)
    for delta, key in growth[:rows]:
        print(f"{delta:+9.1f} ms  {key}  (taskexpert {expert.get(key, 0.0):.1f}, bare {bare.get(key, 0.0):.1f})")


def parse_variant(spec: str) -> dict[str, object]:
    """``head=project,head_channels=44`` -> ``{"head": "project", "head_channels": 44}`` (YAML scalars)."""
    options: dict[str, object] = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"a variant is key=value pairs separated by commas, got {spec!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def variant_name(options: dict[str, object]) -> str:
    """A label of a variant's options: ``head=project,head_channels=44`` or ``defaults``."""
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def gflops_per_image(net: nn.Module, size: tuple[int, int]) -> tuple[float, float]:
    """Forward GFLOPs of one image: the whole network and its ``heads`` (attention counted)."""
    counts = flop_counter(net, size).get_flop_counts()
    root = type(net).__name__
    total = sum(counts[root].values()) / 1e9
    heads = sum(sum(v.values()) for k, v in counts.items() if k.startswith(f"{root}.heads.") and k.count(".") == 2)
    return total, heads / 1e9


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--width", type=int, default=128, help="TaskExpert D")
    parser.add_argument("--head", choices=("bilinear", "project", "deconv"), default=None,
                        help="dense head kind (default: TaskExpert's)")
    parser.add_argument("--head-channels", type=int, default=None, help="hidden width of the heads (default: TaskExpert's)")
    parser.add_argument("--head-scale", type=int, default=None, help="upsampling before the heads' 3x3 conv (default: TaskExpert's)")
    parser.add_argument("--variant", action="append", type=parse_variant, default=[], metavar="KEY=VALUE[,KEY=VALUE...]",
                        help="a TaskExpert variant timed in the same interleaved run (repeatable)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"],
                        help="precisions timed in the same interleaved run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per network, precision and round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="print the operators whose time grows most from the bare network to the first variant")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the polytask command does (polytask.utils.host_memory)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(args.size)
    tasks = pascal_tasks()
    base: dict[str, object] = {"num_experts": args.experts, "width": args.width}
    for key, value in (("head", args.head), ("head_channels", args.head_channels), ("head_scale", args.head_scale)):
        if value is not None:
            base[key] = value
    variants = {variant_name(v): {**base, **v} for v in args.variant} or {variant_name({}): base}
    torch.manual_seed(0)
    nets: dict[str, nn.Module] = {"bare": BareViT(tasks, args.backbone, size)}
    for name, options in variants.items():
        nets[name] = TaskExpert(tasks, backbone=args.backbone, backbone_options={"img_size": size}, **options)
    images = torch.randn(args.batch, 3, *size)
    steps = {(name, p): make_step(net.train(), images, p) for name, net in nets.items() for p in args.precision}
    for step in steps.values():
        timed(step, args.warmup)
    times: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in steps}
    order = list(steps)
    for r in range(args.repeats):  # each round starts one network/precision later: no fixed position in the round
        for key in order[r % len(order):] + order[: r % len(order)]:
            times[key].append(timed(steps[key], args.steps))
    flops = {name: gflops_per_image(net, size) for name, net in nets.items()}
    results = []
    for name, net in nets.items():
        if name == "bare":
            continue
        expert = net  # type: ignore[assignment]
        head = next(iter(expert.heads.values()))
        row: dict[str, object] = {
            "variant": name, "options": variants[name], "head": head.kind, "head_scale": head.scale,
            "head_channels": head.out.in_channels,
            "params": {"bare": sum(p.numel() for p in nets["bare"].parameters()),
                       "taskexpert": sum(p.numel() for p in net.parameters())},
            "forward_gflops_per_image": {"bare": flops["bare"][0], "taskexpert": flops[name][0], "heads": flops[name][1]},
        }
        for p in args.precision:
            row[p] = {}
            for clock, index in CLOCKS.items():
                ours = [t[index] for t in times[(name, p)]]
                bare = [t[index] for t in times[("bare", p)]]
                paired = [e / b for e, b in zip(ours, bare)]
                row[p][clock] = {  # type: ignore[index]
                    "median_step_seconds": {"bare": statistics.median(bare), "taskexpert": statistics.median(ours)},
                    "ratio_of_medians": statistics.median(ours) / statistics.median(bare),
                    "median_paired_ratio": statistics.median(paired), "paired_ratio_range": [min(paired), max(paired)],
                }
        results.append(row)
    result = {
        "backbone": args.backbone, "size": list(size), "batch": args.batch, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup, "precisions": list(args.precision),
        "variants": results,
    }
    print(json.dumps(result, indent=2))
    for row in results:
        for p in args.precision:
            for clock in CLOCKS:
                r = row[p][clock]  # type: ignore[index]
                lo, hi = r["paired_ratio_range"]
                print(f"{row['variant']:>50s} {p} {clock:>4s}: bare {r['median_step_seconds']['bare']:.3f} s, "
                      f"taskexpert {r['median_step_seconds']['taskexpert']:.3f} s, ratio {r['ratio_of_medians']:.3f}, "
                      f"paired {r['median_paired_ratio']:.3f} ({lo:.2f}-{hi:.2f})")
    if args.json:
        step_seconds = {f"{n}/{p}/{clock}": [t[i] for t in ts] for (n, p), ts in times.items() for clock, i in CLOCKS.items()}
        with open(args.json, "w") as f:
            json.dump({**result, "step_seconds": step_seconds}, f, indent=2)
    if args.profile:
        first, precision = next(iter(variants)), args.precision[0]
        print_profile_difference(steps[("bare", precision)], steps[(first, precision)], args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
