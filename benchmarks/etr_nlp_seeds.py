"""ETR-NLP vs hard sharing vs single-task on the quick configs, over several seeds (mean and std).

Trains every quick config (digit pairs and SynthScenes; ``configs/{etr_nlp,hard_sharing,single_task}_*``)
once per seed with the config's budget, without validation during training, evaluates the last
weights on the test split and writes a markdown table: per-task test metrics (mean +- sample
std over seeds) of the metrics that enter Delta_m, Delta_m (in percent) of every seed against the
single-task means over the seeds, the learnable parameters and the training time. Arguments the script
does not know are passed to every run as CLI overrides.

    python benchmarks/etr_nlp_seeds.py --seeds 0 1 2 --threads 1 --out /tmp/etr_nlp_seeds.md
    python benchmarks/etr_nlp_seeds.py --seeds 0 --trainer.max_epochs=1   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polytask.config import instantiate
from polytask.metrics import delta_m

METHODS: tuple[str, ...] = ("etr_nlp", "hard_sharing", "single_task")
SETTINGS: dict[str, dict[str, str]] = {
    "digits": {m: f"configs/{m}_digits.yaml" for m in METHODS},
    "synthscenes": {
        "etr_nlp": "configs/etr_nlp_synthscenes.yaml",
        "hard_sharing": "configs/hard_sharing_synthscenes_etr.yaml",
        "single_task": "configs/single_task_synthscenes_etr.yaml",
    },
}
@dataclass
class Run:
    """Test results of one (setting, method, seed) training."""

    results: dict[str, dict[str, float]]
    params: int
    seconds: float
    directions: dict[str, dict[str, bool]] = field(default_factory=dict)


def train_and_test(config: str, seed: int, workdir: Path, extra: Sequence[str]) -> Run:
    """Fit ``config`` with ``seed`` (no validation, no logger), then test the last weights."""
    overrides = [
        "--seed_everything", str(seed),
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(workdir),
        *extra,
    ]
    cli = instantiate([config], overrides)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    net = cli.model.net
    return Run(
        results=cli.model.results["test"],
        params=sum(p.numel() for p in net.parameters() if p.requires_grad),
        seconds=seconds,
        directions={t.name: t.higher_is_better for t in net.tasks},
    )


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    """``mean +- sample std`` with ``digits`` decimals (std 0 for a single value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def delta_cell(runs: Sequence[Run], reference: dict[str, dict[str, float]]) -> str:
    """``mean +- std`` over seeds of Delta_m (percent) against ``reference``, or why it is undefined."""
    try:
        return mean_std([delta_m(run.results, reference, run.directions) for run in runs], digits=2)
    except ValueError as err:
        return f"undefined ({err})"


def setting_table(setting: str, runs: dict[str, list[Run]]) -> list[str]:
    """Markdown rows of one setting: a row per method."""
    first = runs[METHODS[0]][0]
    columns = [(task, metric) for task, directions in first.directions.items() for metric in directions]
    header = ["method", *(f"{t} {m}" for t, m in columns), "Δm vs single-task mean (%)", "learnable params", "train s/run"]
    reference = {
        task: {m: statistics.fmean(r.results[task][m] for r in runs["single_task"]) for m in directions}
        for task, directions in first.directions.items()
    }
    lines = [f"### {setting}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in METHODS:
        method_runs = runs[method]
        cells = [method, *(mean_std([r.results[t][m] for r in method_runs]) for t, m in columns)]
        cells.append(delta_cell(method_runs, reference))
        cells.append(f"{method_runs[0].params:,}")
        cells.append(f"{statistics.fmean(r.seconds for r in method_runs):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Train and test every quick config for every seed and print (and optionally write) the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lines = [
        "## ETR-NLP quick configs: test metrics over seeds " + ", ".join(map(str, args.seeds)),
        "",
        f"`python benchmarks/etr_nlp_seeds.py --seeds {' '.join(map(str, args.seeds))} --threads {args.threads}"
        + "".join(f" {o}" for o in overrides) + "`; mean ± sample std over seeds; Δm (percent) of each seed "
        "against the single-task means over the seeds (for single-task itself: its seed-to-seed spread); last weights, "
        "no model selection.",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            runs: dict[str, list[Run]] = {m: [] for m in METHODS}
            for method in METHODS:
                for seed in args.seeds:
                    run = train_and_test(SETTINGS[setting][method], seed, Path(tmp) / f"{setting}_{method}_{seed}", overrides)
                    runs[method].append(run)
                    print(f"{setting} {method} seed {seed}: {run.seconds:.0f} s, {run.results}", flush=True)
            lines += setting_table(setting, runs) + [""]
    cpu = f"{os.cpu_count()} CPU cores, {args.threads} torch threads, load average {os.getloadavg()[0]:.1f} at the end"
    lines.append(f"Total wall time {time.perf_counter() - started:.0f} s ({cpu}).")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
