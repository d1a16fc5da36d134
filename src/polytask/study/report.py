"""``polytask study report STUDY_DIR``: the study's tables and plots, from its run folders only.

Writes ``report.md`` (Delta_m of every arm against the reference, paired by seed; every metric
as mean +- std over seeds; parameters and time), ``delta_m.png`` (one row per arm: the per-seed
Delta_m, their mean and bootstrap interval, so one picture shows whether an arm wins) and
``curves.png`` (validation metric against step, mean over seeds with a +-std band).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from polytask.study.spec import StudyError, run_folder, study_from_folder
from polytask.study.stats import PairedSummary, mean_std, paired_delta_m, summarize_seeds
from polytask.study.worker import read_json


@dataclass
class ArmRuns:
    """The finished runs of one arm, by seed, and the seeds that are not finished."""

    name: str
    results: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    curves: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    crashed: dict[int, str] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)


@dataclass
class StudyResults:
    """Everything the report shows, read from a study folder."""

    study: dict[str, Any]
    arms: dict[str, ArmRuns]
    directions: dict[str, dict[str, bool]]
    deltas: dict[str, PairedSummary]
    undefined: dict[str, list[int]] = field(default_factory=dict)


def load_runs(study_dir: Path) -> StudyResults:
    """Read the study description and every run folder of ``study_dir``.

    Raises:
        StudyError: not a study folder, or no finished run of the reference arm.
    """
    study = study_from_folder(study_dir)
    arms: dict[str, ArmRuns] = {}
    directions: dict[str, dict[str, bool]] | None = study.get("directions")
    for arm in study["arms"]:
        runs = ArmRuns(arm)
        for seed in study["seeds"]:
            folder = run_folder(study_dir, arm, seed)
            record = read_json(folder / "run.json", {})
            metrics = read_json(folder / "metrics.json")
            if record.get("status") == "finished" and metrics is not None:
                runs.results[seed] = metrics["results"]
                runs.records[seed] = record
                runs.curves[seed] = read_json(folder / "curve.json", [])
                if directions is None:
                    directions = metrics["directions"]
            elif record.get("status") == "crashed":
                runs.crashed[seed] = record.get("error", "crashed")
            else:
                runs.missing.append(seed)
        arms[arm] = runs
    reference = arms[study["reference"]]
    if not reference.results:
        raise StudyError(f"{study_dir}: no finished run of the reference arm {study['reference']!r} yet")
    assert directions is not None
    deltas, undefined = {}, {}
    for name, runs in arms.items():
        if name == study["reference"]:
            continue
        per_seed = paired_delta_m(runs.results, reference.results, directions)
        undefined[name] = [s for s, v in per_seed.items() if math.isnan(v)]
        summary = _summary_of(per_seed)
        if summary is not None:
            deltas[name] = summary
    return StudyResults(study, arms, directions, deltas, {k: v for k, v in undefined.items() if v})


def _summary_of(per_seed: dict[int, float]) -> PairedSummary | None:
    """Paired statistics of the seeds whose Delta_m is defined, in seed order; None when none is."""
    defined = [v for _, v in sorted(per_seed.items()) if not math.isnan(v)]
    return summarize_seeds(defined) if defined else None


def _delta_row(label: str, summary: PairedSummary) -> str:
    """One Markdown row: label, seeds, mean ± std, bootstrap interval, sign agreement, every seed's value."""
    std = "" if math.isnan(summary.std) else f" ± {summary.std:.2f}"
    per_seed = ", ".join(f"{v:+.2f}" for v in summary.values)
    return (
        f"| {label} | {summary.n} | {summary.mean:+.2f}{std} | [{_fmt(summary.ci_low)}, {_fmt(summary.ci_high)}] "
        f"| {summary.agree} of {summary.n} | {per_seed} |"
    )


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.{digits}f}"


def _mean_std_text(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    return f"{mean:.{digits}g}" if math.isnan(std) else f"{mean:.{digits}g} ± {std:.2g}"


def _seconds_text(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.0f}" if math.isnan(std) else f"{mean:.0f} ± {std:.0f}"


def delta_table(results: StudyResults) -> list[str]:
    """Markdown rows: Delta_m of each arm against the reference with its paired statistics."""
    ref = results.study["reference"]
    lines = [
        f"| arm | seeds | Δm vs {ref} (%) mean ± std | 95 % bootstrap CI | seeds with the mean's sign | per seed |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_delta_row(name, summary) for name, summary in results.deltas.items()]
    return lines


def metric_table(results: StudyResults) -> list[str]:
    """Markdown rows: every task metric of every arm, mean ± std over seeds (↑/↓ marks Delta_m's metrics)."""
    arms = list(results.arms)
    lines = ["| task | metric | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    reference = results.arms[results.study["reference"]]
    first = reference.results[min(reference.results)]
    for task, metrics in first.items():
        for metric in metrics:
            mark = results.directions.get(task, {}).get(metric)
            label = metric + ("" if mark is None else (" ↑" if mark else " ↓"))
            cells = [_mean_std_text([r[task][metric] for r in results.arms[a].results.values()
                                     if metric in r.get(task, {})]) for a in arms]
            lines.append(f"| {task} | {label} | " + " | ".join(cells) + " |")
    return lines


def cost_table(results: StudyResults) -> list[str]:
    """Markdown rows: learnable/frozen parameters, steps, wall and CPU time per run of each arm."""
    lines = ["| arm | finished | learnable params | frozen | steps | wall s / run | CPU s / run |", "|---|---|---|---|---|---|---|"]
    for name, runs in results.arms.items():
        records = list(runs.records.values())
        total = len(results.study["seeds"])
        if not records:
            lines.append(f"| {name} | 0 of {total} | – | – | – | – | – |")
            continue
        params = records[0].get("params", {})
        lines.append(
            f"| {name} | {len(records)} of {total} | {params.get('learnable', 0):,} | {params.get('frozen', 0):,} "
            f"| {records[0].get('global_step', '–')} | {_seconds_text([r['wall_s'] for r in records])} "
            f"| {_seconds_text([r['cpu_s'] for r in records])} |"
        )
    return lines


def plot_deltas(results: StudyResults, path: Path) -> None:
    """One row per arm: per-seed Delta_m (dots), mean (diamond) and bootstrap interval (bar)."""
    names = list(results.deltas)
    fig = Figure(figsize=(7.5, 1.0 + 0.6 * max(len(names), 1)), layout="constrained")
    ax = fig.subplots()
    for row, name in enumerate(names):
        s = results.deltas[name]
        wins = not math.isnan(s.ci_low) and s.ci_low > 0
        loses = not math.isnan(s.ci_high) and s.ci_high < 0
        colour = "tab:green" if wins else "tab:red" if loses else "tab:grey"
        jitter = np.linspace(-0.12, 0.12, len(s.values)) if len(s.values) > 1 else np.zeros(1)
        ax.scatter(s.values, row + jitter, color=colour, alpha=0.6, s=18, zorder=2)
        if not math.isnan(s.ci_low):
            ax.hlines(row, s.ci_low, s.ci_high, color=colour, linewidth=3, alpha=0.5, zorder=1)
        ax.scatter([s.mean], [row], marker="D", color="black", s=30, zorder=3)
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δm vs {results.study['reference']} (%), paired by seed; > 0 is better")
    ax.set_title(f"{results.study['name']}: dots = seeds, ◆ = mean, bar = 95 % bootstrap CI "
                 "(green: CI > 0, red: CI < 0)", fontsize=9)
    fig.savefig(path, dpi=110)


def plot_curves(results: StudyResults, path: Path) -> bool:
    """Validation metric vs step per Delta_m metric; per arm the mean over seeds and a ±std band.

    Returns False (and writes nothing) when no run recorded a curve.
    """
    panels = [(t, m) for t, metrics in results.directions.items() for m in metrics]
    if not any(runs.curves.get(s) for runs in results.arms.values() for s in runs.curves):
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (task, metric) in zip(axes, panels):
        for name, runs in results.arms.items():
            by_step: dict[int, list[float]] = {}
            for curve in runs.curves.values():
                for entry in curve:
                    value = entry["results"].get(task, {}).get(metric)
                    if value is not None:
                        by_step.setdefault(entry["step"], []).append(value)
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = np.array([np.mean(by_step[s]) for s in steps])
            std = np.array([np.std(by_step[s]) for s in steps])
            (line,) = ax.plot(steps, mean, label=name)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        arrow = "↑" if results.directions[task][metric] else "↓"
        ax.set_title(f"{task} {metric} {arrow}", fontsize=10)
        ax.set_xlabel("step")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results.study['name']}: validation metrics, mean over seeds ± std", fontsize=10)
    fig.savefig(path, dpi=100)
    return True


def _status_lines(results: StudyResults) -> list[str]:
    lines = []
    for name, runs in results.arms.items():
        for seed, error in runs.crashed.items():
            lines.append(f"- **crashed**: {name} seed {seed}: {error.splitlines()[0][:200]}")
        if runs.missing:
            lines.append(f"- not finished: {name} seeds {runs.missing}")
    for name, seeds in results.undefined.items():
        lines.append(f"- Δm undefined for {name} seeds {seeds}: a reference metric is 0 on that seed")
    return lines


def comparison_table(results: StudyResults, comparisons: Sequence[tuple[str, str]]) -> list[str]:
    """Markdown rows: Delta_m of each ``(arm, baseline)`` pair, paired by seed, as :func:`delta_table`.

    Raises:
        StudyError: a pair names an arm the study does not have, or compares an arm with itself.
    """
    lines = [
        "| arm vs baseline | seeds | Δm (%) mean ± std | 95 % bootstrap CI | seeds with the mean's sign | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for arm, baseline in comparisons:
        unknown = [a for a in (arm, baseline) if a not in results.arms]
        if unknown or arm == baseline:
            problem = f"unknown arm(s) {unknown}" if unknown else "an arm compared with itself"
            raise StudyError(f"comparison {arm}:{baseline}: {problem}; the arms are {list(results.arms)}")
        per_seed = paired_delta_m(results.arms[arm].results, results.arms[baseline].results, results.directions)
        summary = _summary_of(per_seed)
        label = f"{arm} vs {baseline}"
        lines.append(_delta_row(label, summary) if summary else f"| {label} | 0 | no seed where both finished | | | |")
    return lines


def write_report(study_dir: Path, comparisons: Sequence[tuple[str, str]] = ()) -> Path:
    """Write ``report.md``, ``delta_m.png`` and ``curves.png`` into ``study_dir``; returns the report path.

    Args:
        study_dir: the study folder.
        comparisons: further ``(arm, baseline)`` pairs whose Δm the report gives, paired by seed
            (e.g. the full model against an ablation, neither of them the reference).
    """
    results = load_runs(study_dir)
    extra = comparison_table(results, comparisons) if comparisons else []
    study = results.study
    records = [r for runs in results.arms.values() for r in runs.records.values()]
    commits = sorted({f"{r.get('commit') or 'unknown'}{' (dirty)' if r.get('dirty') else ''}" for r in records})
    machines = sorted({f"{r['machine']['processor']}, {r['machine']['cpus']} CPUs, {r['threads']} threads/run"
                       for r in records if "machine" in r})
    status = _status_lines(results)
    lines = [
        f"# Study `{study['name']}`",
        "",
        f"Final weights scored on the **{study['split']}** split (split-level metrics); seeds {study['seeds']}; "
        f"reference arm **{study['reference']}**. Δm is the mean relative change over tasks of the metrics "
        "marked ↑/↓ below (positive: better than the reference), computed per seed against the reference "
        "run of the same seed.",
        "",
        f"Runs finished: {len(records)} of {len(study['seeds']) * len(study['arms'])}; total wall time "
        f"{sum(r['wall_s'] for r in records) / 60:.1f} min, CPU time {sum(r['cpu_s'] for r in records) / 60:.1f} min. "
        f"Code: {', '.join(commits)}. Machine: {'; '.join(machines)}.",
        *(["", *status] if status else []),
        "",
        "## Δm against the reference, paired by seed",
        "",
        *delta_table(results),
        "",
        "![Δm per arm](delta_m.png)",
        "",
        *(["## Other paired comparisons", "", *extra, ""] if extra else []),
        f"## Metrics ({study['split']} split, mean ± std over seeds)",
        "",
        *metric_table(results),
        "",
        "## Cost",
        "",
        *cost_table(results),
    ]
    plot_deltas(results, study_dir / "delta_m.png")
    if plot_curves(results, study_dir / "curves.png"):
        lines += ["", "## Learning curves (validation)", "", "![learning curves](curves.png)"]
    path = study_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

