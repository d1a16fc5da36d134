"""Task interference: do the tasks' gradients on the shared parameters agree or fight?

Every ``every_n_steps`` training steps, :class:`TaskInterference` back-propagates each task's
loss alone to the network's shared parameters (:meth:`~polytask.models.base.MultiTaskNet.shared_parameters`:
the backbone and decoder of hard sharing, TaskExpert's ViT and experts, ETR-NLP's shared
channels), giving one gradient ``g_t`` per task, and measures per pair of tasks

* the cosine similarity ``g_a . g_b / (|g_a| |g_b|)`` (below 0: the tasks pull the shared
  parameters in conflicting directions at that step), and
* the gradient-norm ratio ``|g_a| / |g_b|`` (how much more one task moves them than the other).

They are logged as ``interference/cos/<a>/<b>`` and ``interference/norm_ratio/<a>/<b>`` at every
measurement (straight to every logger: TensorBoard, CSV), accumulated over the run (and kept in the checkpoint), and when fit
ends written to ``<run folder>/interference/``: ``heatmap.png`` (task x task mean cosine and
fraction of conflicting measurements), ``summary.json`` and ``summary.md``.

Cost: ``T`` extra backward passes through the network (each stops at the shared parameters'
inputs only where autograd can), every ``every_n_steps`` steps; nothing on the other steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from torch import nn

from polytask.utils.files import atomic_write, write_json_atomic
from polytask.weighting import gradient_matrix, shared_parameters_of


def pairwise(gradients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities ``(T, T)`` and norms ``(T,)`` of the rows of ``gradients`` ``(T, P)``.

    A zero row has cosine 0 with every row (and 1 with itself).
    """
    gram = gradients.double() @ gradients.double().T
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
    cos.fill_diagonal_(1.0)
    return cos.clamp(-1, 1), norms


class InterferenceStats:
    """Running sums over the measurements of a run: cosines, conflicts (cosine < 0), norm ratios and norms.

    Args:
        num_tasks: ``T``.
    """

    def __init__(self, num_tasks: int) -> None:
        self.count = 0
        self.seconds = 0.0
        self.cos_sum = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self.conflicts = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self.ratio_sum = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        self.norm_sum = torch.zeros(num_tasks, dtype=torch.float64)

    def update(self, cos: torch.Tensor, norms: torch.Tensor, seconds: float = 0.0) -> None:
        """Add one measurement: cosines ``(T, T)``, norms ``(T,)`` and the seconds it took."""
        cos, norms = cos.detach().cpu().double(), norms.detach().cpu().double()
        self.count += 1
        self.seconds += seconds
        self.cos_sum += cos
        self.conflicts += (cos < 0).double()
        self.ratio_sum += norms[:, None] / norms[None, :].clamp_min(1e-300)
        self.norm_sum += norms

    def means(self) -> dict[str, torch.Tensor]:
        """``cos`` and ``conflict_fraction`` ``(T, T)``, ``norm_ratio`` ``(T, T)`` (row over column), ``norm`` ``(T,)``."""
        n = max(self.count, 1)
        return {
            "cos": self.cos_sum / n,
            "conflict_fraction": self.conflicts / n,
            "norm_ratio": self.ratio_sum / n,
            "norm": self.norm_sum / n,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "seconds": self.seconds,
            "cos_sum": self.cos_sum,
            "conflicts": self.conflicts,
            "ratio_sum": self.ratio_sum,
            "norm_sum": self.norm_sum,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.seconds = float(state.get("seconds", 0.0))
        for key in ("cos_sum", "conflicts", "ratio_sum", "norm_sum"):
            setattr(self, key, state[key].detach().cpu().double().clone())


def plot_interference(means: Mapping[str, torch.Tensor], tasks: Sequence[str], path: Path, title: str) -> None:
    """Two task x task heatmaps (mean cosine on [-1, 1]; fraction of conflicting measurements on [0, 1]) into ``path`` (PNG)."""
    size = 1.0 + 0.55 * len(tasks)
    fig = Figure(figsize=(2 * size + 1.5, size + 0.8), layout="constrained")
    panels = (
        ("cos", "mean cosine of task gradients", "RdBu", -1.0, 1.0),
        ("conflict_fraction", "fraction of steps with cosine < 0", "Reds", 0.0, 1.0),
    )
    for ax, (key, label, cmap, vmin, vmax) in zip(fig.subplots(1, 2), panels):
        values = means[key].numpy()
        image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_title(label, fontsize=9)
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(value) > 0.6 else "black")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=10)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def summary_markdown(means: Mapping[str, torch.Tensor], tasks: Sequence[str], count: int, every: int) -> str:
    """A Markdown table, one row per pair of tasks: mean cosine, conflict fraction, mean norm ratio."""
    lines = [
        f"Task gradients on the shared parameters, {count} measurements (every {every} steps).",
        "",
        "| task a | task b | mean cosine | steps with cosine < 0 | mean norm ratio a / b |",
        "|---|---|---|---|---|",
    ]
    for i, a in enumerate(tasks):
        for j in range(i + 1, len(tasks)):
            lines.append(
                f"| {a} | {tasks[j]} | {means['cos'][i, j]:.3f} | {100 * means['conflict_fraction'][i, j]:.0f} % "
                f"| {means['norm_ratio'][i, j]:.3g} |"
            )
    return "\n".join(lines) + "\n"


class TaskInterference(pl.Callback):
    """Measure, log and summarise task interference on the shared parameters (see the module docstring).

    Needs a module that computes every task's loss in one training step and keeps them in
    ``step_task_losses`` (:class:`~polytask.training.MultiTaskModule`; not the per-task optimisation of
    :class:`~polytask.training.per_task.PerTaskModule`), and a network that shares parameters between its
    tasks. Under DDP each process's gradient matrix is averaged over the processes before the cosines,
    so they are those of the whole batch; only global rank 0 writes files.

    Args:
        every_n_steps: measure at the global steps divisible by it (the first step included).
        out_dir: where the summary goes (default ``<trainer log dir>/interference``).
    """

    def __init__(self, every_n_steps: int = 50, out_dir: str | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"TaskInterference: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.out_dir = out_dir
        self.tasks: list[str] = []
        self.stats: InterferenceStats | None = None
        self._params: list[nn.Parameter] = []
        self._measured_step = -1
        self._loaded: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        net = getattr(pl_module, "net", None)
        if not pl_module.automatic_optimization or not hasattr(pl_module, "step_task_losses"):
            raise ValueError(
                f"TaskInterference needs all task losses of a training step at once; {type(pl_module).__name__} "
                "does not compute them together (per-task optimisation trains one task per step)"
            )
        pl_module.keep_task_graphs = True  # the step must not back-propagate task by task before this callback reads the losses
        self.tasks = list(net.task_names)
        self._params = shared_parameters_of(net)
        if len(self.tasks) < 2 or not self._params:
            raise ValueError(
                f"TaskInterference: {type(net).__name__} with tasks {self.tasks} has "
                + ("one task" if len(self.tasks) < 2 else "no parameters shared by its tasks")
                + ": there is no interference to measure"
            )
        self.stats = InterferenceStats(len(self.tasks))
        if self._loaded is not None:
            if self._loaded["tasks"] != self.tasks:
                raise ValueError(f"TaskInterference: the checkpoint measured tasks {self._loaded['tasks']}, this run has {self.tasks}")
            self.stats.load_state_dict(self._loaded["stats"])
            self._loaded = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        step = trainer.global_step
        if self.stats is None or step % self.every_n_steps or step == self._measured_step:
            return
        self._measured_step = step  # once per optimizer step, also with gradient accumulation
        start = time.perf_counter()
        losses = pl_module.step_task_losses
        gradients = gradient_matrix([losses[t] for t in self.tasks], self._params)
        if trainer.world_size > 1:
            gradients = trainer.strategy.reduce(gradients, reduce_op="mean")
        cos, norms = pairwise(gradients)
        self.stats.update(cos, norms, time.perf_counter() - start)
        logged = {}
        for i, a in enumerate(self.tasks):
            for j in range(i + 1, len(self.tasks)):
                b = self.tasks[j]
                logged[f"interference/cos/{a}/{b}"] = float(cos[i, j])
                logged[f"interference/norm_ratio/{a}/{b}"] = float(norms[i] / norms[j]) if norms[j] > 0 else math.inf
        self._log(trainer, logged)

    @staticmethod
    @rank_zero_only
    def _log(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
        """Straight to every logger at this step (``self.log`` would keep only every ``log_every_n_steps``-th)."""
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stats is None or self.stats.count == 0:
            return
        out_dir = Path(self.out_dir) if self.out_dir else Path(trainer.log_dir or trainer.default_root_dir) / "interference"
        self._write(out_dir)

    @rank_zero_only
    def _write(self, out_dir: Path) -> None:
        assert self.stats is not None
        means = self.stats.means()
        count = self.stats.count
        payload = {
            "tasks": self.tasks,
            "measurements": count,
            "every_n_steps": self.every_n_steps,
            "measure_seconds": self.stats.seconds,
            **{key: value.tolist() for key, value in means.items()},
        }
        write_json_atomic(out_dir / "summary.json", payload)
        markdown = summary_markdown(means, self.tasks, count, self.every_n_steps)
        atomic_write(out_dir / "summary.md", lambda f: f.write(markdown.encode()))
        plot_interference(means, self.tasks, out_dir / "heatmap.png", f"task interference on the shared parameters ({count} measurements)")
        table = Table(title=f"task interference ({count} measurements, every {self.every_n_steps} steps)")
        for column in ("tasks", "mean cos", "cos < 0", "norm ratio"):
            table.add_column(column, justify="left" if column == "tasks" else "right")
        for i, a in enumerate(self.tasks):
            for j in range(i + 1, len(self.tasks)):
                table.add_row(
                    f"{a} / {self.tasks[j]}",
                    f"{means['cos'][i, j]:.3f}",
                    f"{100 * means['conflict_fraction'][i, j]:.0f} %",
                    f"{means['norm_ratio'][i, j]:.3g}",
                )
        console = Console()
        console.print(table)
        console.print(f"task-interference heatmap: {out_dir / 'heatmap.png'} (measuring took {self.stats.seconds:.1f} s)", soft_wrap=True)

    def state_dict(self) -> dict[str, Any]:
        if self.stats is None:
            return {}
        return {"tasks": self.tasks, "stats": self.stats.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.stats is None:  # before setup: applied there
            self._loaded = dict(state_dict)
            return
        if state_dict["tasks"] != self.tasks:
            raise ValueError(f"TaskInterference: the checkpoint measured tasks {state_dict['tasks']}, this run has {self.tasks}")
        self.stats.load_state_dict(state_dict["stats"])
