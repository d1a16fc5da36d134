"""Training-step cost of TaskExpert relative to its bare ViT backbone with a plain head.

Both networks use the same timm ViT (default ViT-S/16, random weights) on the same batch and
the five PASCAL-Context tasks. The reference ("bare") network reads the last block's tokens
(with the final norm) and predicts every task with one Conv1x1 followed by bilinear upsampling
to the input size. One training step is forward + backward of the sum of the outputs' mean
squares + an Adam step. The two networks are timed interleaved (round-robin, after warm-up),
and the script reports the median step time of each and their ratio.

    python benchmarks/taskexpert_overhead.py                       # TaskExpert defaults (head_scale 4)
    python benchmarks/taskexpert_overhead.py --head-scale 1        # heads on the token grid
    python benchmarks/taskexpert_overhead.py --profile             # which operators the extra time goes to
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from polytask.models.backbones import create_timm_model
from polytask.models.taskexpert import TaskExpert
from polytask.models.summary import count_flops
from polytask.tasks import Task, build_task


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


def make_step(net: nn.Module, images: torch.Tensor):  # type: ignore[no-untyped-def]
    """A closure running one training step (forward, backward, Adam) of ``net`` on ``images``."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-5)

    def step() -> None:
        out = net(images)
        loss = sum(o.float().square().mean() for o in out.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def timed(step, steps: int) -> float:  # type: ignore[no-untyped-def]
    """Mean seconds per call of ``step`` over ``steps`` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def self_times(step, steps: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Self CPU milliseconds per call of ``step`` by operator, from ``torch.profiler`` over ``steps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {event.key: event.self_cpu_time_total / 1e3 / steps for event in prof.key_averages()}


def print_profile_difference(steps: dict, calls: int, rows: int = 12) -> None:  # type: ignore[type-arg]
    """Print the operators whose self CPU time per step grows most from the bare network to TaskExpert."""
    bare, expert = self_times(steps["bare"], calls), self_times(steps["taskexpert"], calls)
    print(f"profiled step: bare {sum(bare.values()):.0f} ms, taskexpert {sum(expert.values()):.0f} ms (self CPU)")
    growth = sorted(((expert.get(k, 0.0) - bare.get(k, 0.0), k) for k in set(bare) | set(expert)), reverse=True)
    for delta, key in growth[:rows]:
        print(f"{delta:+9.1f} ms  {key}  (taskexpert {expert.get(key, 0.0):.1f}, bare {bare.get(key, 0.0):.1f})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--width", type=int, default=128, help="TaskExpert D")
    parser.add_argument("--head-channels", type=int, default=None, help="hidden width of the heads (default D)")
    parser.add_argument("--head-scale", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=3, help="steps per model and round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="print the operators whose time grows most from the bare network to TaskExpert")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(args.size)
    tasks = pascal_tasks()
    torch.manual_seed(0)
    bare = BareViT(tasks, args.backbone, size)
    expert = TaskExpert(tasks, backbone=args.backbone, backbone_options={"img_size": size}, num_experts=args.experts,
                        width=args.width, head_channels=args.head_channels, head_scale=args.head_scale)
    nets = {"bare": bare, "taskexpert": expert}
    images = torch.randn(args.batch, 3, *size)
    steps = {name: make_step(net.train(), images) for name, net in nets.items()}
    for step in steps.values():
        timed(step, args.warmup)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(timed(step, args.steps))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    with sdpa_kernel(SDPBackend.MATH):  # count attention too (the fused CPU kernel has no FLOP formula)
        flops = {name: count_flops(net, size) / 1e9 for name, net in nets.items()}
    paired = statistics.median(e / b for e, b in zip(times["taskexpert"], times["bare"]))
    result = {
        "backbone": args.backbone, "size": list(size), "batch": args.batch, "threads": torch.get_num_threads(),
        "taskexpert": {"experts": args.experts, "width": args.width, "head_channels": args.head_channels or args.width,
                       "head_scale": args.head_scale},
        "params": {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()},
        "forward_gflops_per_image": flops,
        "step_seconds": times, "median_step_seconds": medians,
        "ratio_of_medians": medians["taskexpert"] / medians["bare"], "median_paired_ratio": paired,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "step_seconds"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.profile:
        print_profile_difference(steps, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
