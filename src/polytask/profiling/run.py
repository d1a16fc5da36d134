"""Benchmarking one or two configs on each device (``--versus``: both sides in one interleaved run)."""

from __future__ import annotations

import resource
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from polytask.profiling.bare import make_bare_net
from polytask.profiling.experiment import Experiment
from polytask.profiling.inputs import BenchInputs, bench_inputs
from polytask.profiling.loader import LoaderStats
from polytask.profiling.memory import peak_memory_mb, top_operators
from polytask.profiling.timing import Result, Variant, ratios, time_interleaved
from polytask.profiling.variants import build_variants, unused_parameters
from polytask.utils.host_memory import host_malloc_state


def _process_figures() -> dict[str, Any]:
    """What a report records of the process itself: peak resident memory (MiB) and the host allocator's setting."""
    return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host_malloc": host_malloc_state()}


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
    if net.per_task_mode:
        nets["per_task"] = net
    else:
        skipped["per_task"] = f"{type(net).__name__} has no per-task mode"
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
    unused = unused_parameters(nets["model"], runs.get("model/fp32/eager/train"))
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
    """Benchmark ``experiment`` on every device; returns the JSON report (see :func:`polytask.cli.bench.main`).

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
    report.update(_process_figures())
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
        The base's report (:func:`polytask.cli.bench.main`) with a ``versus`` entry: the other side's report
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
    report.update(_process_figures())
    return report
