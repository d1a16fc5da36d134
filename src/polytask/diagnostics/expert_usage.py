"""Expert usage of mixture-of-experts networks: gate statistics, heatmaps and dominant-expert maps.

A network takes part when it exposes the gate-recording interface of
:class:`~polytask.models.taskexpert.TaskExpert` (:class:`GateRecorder`): set ``record_gates`` and
every forward leaves in ``gate_record`` one tensor ``(B, T, S_l, h, w)`` of gate weights per
MMoE layer (``S_l`` slots: the experts, then the memory when the layer reads it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rich.console import Console
from rich.table import Table
from torch import nn

from polytask.utils.files import write_json_atomic


@runtime_checkable
class GateRecorder(Protocol):
    """What a network offers to the expert-usage diagnostics."""

    record_gates: bool
    gate_record: list[torch.Tensor]
    mmoe_blocks: list[int]
    learned_gates: bool

    @property
    def task_names(self) -> list[str]: ...

    def gate_slot_names(self) -> list[list[str]]: ...


class GateUsage:
    """Running mean gate weight per layer, task and slot, over every token of every image seen."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []
        self.counts: list[int] = []

    def reset(self) -> None:
        """Forget everything accumulated."""
        self.sums, self.counts = [], []

    def update(self, records: Sequence[torch.Tensor]) -> None:
        """Add one batch: per layer, gate weights ``(B, T, S, h, w)``."""
        if not self.sums:
            self.sums = [torch.zeros(r.shape[1:3], dtype=torch.float64) for r in records]
            self.counts = [0] * len(records)
        for i, record in enumerate(records):
            self.sums[i] += record.detach().double().sum(dim=(0, 3, 4)).cpu()
            self.counts[i] += record.shape[0] * record.shape[3] * record.shape[4]

    def compute(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per layer, the mean gate weight ``(T, S)`` (every row sums to 1).

        Args:
            reduce: sums a tensor over processes (e.g. the strategy's all-reduce) before dividing.
        """
        if not self.sums:
            raise RuntimeError("no gate weights were accumulated")
        sums = [reduce(s) if reduce else s for s in self.sums]
        counts = torch.tensor(self.counts, dtype=torch.float64)
        counts = reduce(counts) if reduce else counts
        return [s.cpu() / c.cpu() for s, c in zip(sums, counts)]


def gate_recorder_of(module: nn.Module) -> GateRecorder | None:
    """The gate-recording network of a Lightning module (its ``net``) or the module itself, if its
    gates are learned; else None (no gates, or fixed ones such as the static control's ``1/N``)."""
    for candidate in (getattr(module, "net", None), module):
        if isinstance(candidate, GateRecorder):
            return candidate if candidate.learned_gates else None
    return None


def usage_payload(
    means: Sequence[torch.Tensor], tasks: Sequence[str], slots: Sequence[Sequence[str]], blocks: Sequence[int]
) -> dict[str, object]:
    """JSON-ready usage: per layer its block, its slot names and the ``(T, S)`` mean gate weights
    as ``{task: {slot: weight}}``."""
    return {
        "tasks": list(tasks),
        "layers": [
            {
                "block": int(block),
                "slots": list(names),
                "mean_gate": {t: {s: float(m[i, j]) for j, s in enumerate(names)} for i, t in enumerate(tasks)},
            }
            for m, names, block in zip(means, slots, blocks)
        ],
    }


def usage_summary(
    means: Sequence[torch.Tensor],
    tasks: Sequence[str],
    slots: Sequence[Sequence[str]],
    blocks: Sequence[int],
    title: str = "expert usage",
) -> Table:
    """A short table of mean gate weights: per task (rows) and MMoE layer (columns), the most used
    expert and its weight, and the memory's weight where the layer reads it.

    Args:
        means: per layer ``(T, S)`` mean gate weights.
        tasks: ``T`` task names.
        slots: per layer the ``S`` slot names (``e0 .. e{N-1}``, then ``memory`` when read).
        blocks: per layer the ViT block it follows.
    """
    table = Table(title=title, caption="top expert and its mean gate weight; mem: the memory's weight")
    table.add_column("task", style="bold")
    for block in blocks:
        table.add_column(f"block {block}")
    for i, task in enumerate(tasks):
        cells = []
        for m, names in zip(means, slots):
            experts = [j for j, name in enumerate(names) if name != "memory"]
            top = max(experts, key=lambda j: float(m[i, j]))
            cell = f"{names[top]} {float(m[i, top]):.2f}"
            if "memory" in names:
                cell += f"  mem {float(m[i, list(names).index('memory')]):.2f}"
            cells.append(cell)
        table.add_row(task, *cells)
    return table


def plot_usage_heatmaps(
    means: Sequence[torch.Tensor],
    tasks: Sequence[str],
    slots: Sequence[Sequence[str]],
    blocks: Sequence[int],
    path: str | Path,
    title: str = "mean gate weight",
) -> Path:
    """Write a PNG with one panel per MMoE layer: tasks (rows) x experts and memory (columns)."""
    fig = Figure(figsize=(1.0 + 0.55 * sum(len(s) for s in slots) + 1.2 * len(means), 1.2 + 0.45 * len(tasks)))
    axes = fig.subplots(1, len(means), squeeze=False)
    vmax = max(float(m.max()) for m in means)
    for ax, m, names, block in zip(axes[0], means, slots, blocks):
        image = ax.imshow(m.numpy(), vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(f"after block {block}")
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0, 0] else [""] * len(tasks))
        for (i, j), value in np.ndenumerate(m.numpy()):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="black" if value > 0.6 * vmax else "white")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, y=1.04)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


class ExpertUsageMonitor(pl.Callback):
    """Mean gate weight per task x slot x layer over each validation, logged and saved.

    After every validation (not the sanity check) it sums the statistics over processes, logs
    ``experts/block<b>/<task>/<slot>`` and writes ``<dir>/step<step>.png`` (heatmaps, one panel
    per layer) and ``<dir>/step<step>.json``. When ``fit`` ends it prints a short summary of the
    last validation's usage (per task and layer the most used expert, and the memory's share)
    and where the picture is. Networks without learned gates are left alone, silently: every polytask run
    has this callback (:mod:`polytask.training.standard_callbacks`).

    Under DDP every process takes part in the sums and in resolving the directory (reading
    ``trainer.log_dir`` is a broadcast: on rank 0 alone it would wait forever for the others);
    only global rank 0 writes the files.

    Args:
        out_dir: where the files go (default ``<trainer log dir>/expert_usage``).
        log_scalars: log the means through the module's loggers.
    """

    def __init__(self, out_dir: str | None = None, log_scalars: bool = True) -> None:
        self.out_dir = out_dir
        self.log_scalars = log_scalars
        self.usage = GateUsage()
        self._net: GateRecorder | None = None
        self._last: tuple[int, list[torch.Tensor], list[str], list[list[str]], list[int], Path] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = None

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._net = None if trainer.sanity_checking else gate_recorder_of(pl_module)
        if self._net is None:
            return
        self.usage.reset()
        self._net.record_gates = True

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._net is not None:
            self.usage.update(self._net.gate_record)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self._net
        if net is None:
            return
        net.record_gates = False
        net.gate_record = []
        self._net = None
        means = self.usage.compute(lambda t: trainer.strategy.reduce(t.to(pl_module.device), reduce_op="sum"))
        tasks, slots, blocks = net.task_names, net.gate_slot_names(), net.mmoe_blocks
        if self.log_scalars:
            pl_module.log_dict(
                {
                    f"experts/block{b}/{t}/{s}": float(m[i, j])
                    for m, names, b in zip(means, slots, blocks)
                    for i, t in enumerate(tasks)
                    for j, s in enumerate(names)
                }
            )
        out_dir = Path(self.out_dir) if self.out_dir else Path(trainer.log_dir or trainer.default_root_dir) / "expert_usage"
        self._write(trainer, out_dir, means, tasks, slots, blocks)
        self._last = (trainer.global_step, means, tasks, slots, blocks, out_dir / f"step{trainer.global_step:07d}.png")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last is not None:
            self._print_summary(*self._last)

    @staticmethod
    @rank_zero_only
    def _print_summary(
        step: int, means: list[torch.Tensor], tasks: list[str], slots: list[list[str]], blocks: list[int], picture: Path
    ) -> None:
        """Print :func:`usage_summary` of the last validation and where its picture is (rank 0 only)."""
        console = Console()
        console.print(usage_summary(means, tasks, slots, blocks, f"expert usage (validation, step {step})"))
        console.print(f"expert-usage picture: {picture}", soft_wrap=True)

    @rank_zero_only
    def _write(
        self, trainer: pl.Trainer, out_dir: Path, means: list[torch.Tensor], tasks: list[str], slots: list[list[str]], blocks: list[int]
    ) -> None:
        """Write the JSON and PNG of one validation into ``out_dir`` (rank 0 only: no collective in here)."""
        stem = out_dir / f"step{trainer.global_step:07d}"
        payload = {"epoch": trainer.current_epoch, "step": trainer.global_step, **usage_payload(means, tasks, slots, blocks)}
        write_json_atomic(stem.with_suffix(".json"), payload)
        plot_usage_heatmaps(
            means, tasks, slots, blocks, stem.with_suffix(".png"), title=f"mean gate weight (validation, step {trainer.global_step})"
        )


def dominant_expert_maps(net: nn.Module, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per task and MMoE layer, the slot with the largest gate weight at every pixel.

    Gate weights are upsampled bilinearly from the token grid to the image size before the argmax.

    Args:
        net: a :class:`GateRecorder` network.
        image: one normalised image ``(3, H, W)``.

    Returns:
        ``{task: [per layer, int64 (H, W) slot indices]}`` (index ``N`` is the memory where read).
    """
    if not isinstance(net, GateRecorder):
        raise TypeError(f"{type(net).__name__} does not record gate weights")
    was_training, was_recording = net.training, net.record_gates
    net.eval()
    net.record_gates = True
    try:
        with torch.no_grad():
            net(image.unsqueeze(0).to(next(net.parameters()).device))
        records = net.gate_record
    finally:
        net.train(was_training)
        net.record_gates = was_recording
        net.gate_record = []
    size = tuple(image.shape[-2:])
    maps: dict[str, list[torch.Tensor]] = {t: [] for t in net.task_names}
    for record in records:
        _, num_tasks, num_slots, h, w = record.shape
        up = F.interpolate(record.reshape(1, num_tasks * num_slots, h, w), size=size, mode="bilinear", align_corners=False).reshape(
            num_tasks, num_slots, *size
        )
        for t, labels in zip(net.task_names, up.argmax(dim=1).cpu()):
            maps[t].append(labels)
    return maps


def plot_dominant_experts(
    rgb: np.ndarray,
    maps: Mapping[str, Sequence[torch.Tensor]],
    slots: Sequence[Sequence[str]],
    blocks: Sequence[int],
    path: str | Path,
) -> Path:
    """Write a PNG: the image, then one row per task with its dominant-slot map per layer.

    Args:
        rgb: the image ``(H, W, 3)`` uint8.
        maps: output of :func:`dominant_expert_maps`.
        slots: slot names per layer.
        blocks: block number of every layer.
        path: the PNG to write.
    """
    names = max(slots, key=len)
    palette = "tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo"
    cmap = colormaps[palette].resampled(len(names))
    tasks = list(maps)
    cols = len(blocks) + 1
    fig = Figure(figsize=(2.2 * cols, 1.8 * len(tasks) + 0.6))
    axes = fig.subplots(len(tasks), cols, squeeze=False)
    for row, task in enumerate(tasks):
        axes[row, 0].imshow(rgb)
        axes[row, 0].set_ylabel(task)
        for col, (labels, block) in enumerate(zip(maps[task], blocks), start=1):
            axes[row, col].imshow(labels.numpy(), cmap=cmap, vmin=0, vmax=cmap.N - 1, interpolation="nearest")
            if row == 0:
                axes[row, col].set_title(f"after block {block}")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(
        handles=[Patch(color=cmap(k), label=n) for k, n in enumerate(names)],
        loc="lower center",
        ncol=min(len(names), 9),
        fontsize=7,
        frameon=False,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out
