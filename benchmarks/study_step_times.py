"""Training-step time and learnable parameters of every arm of a study, measured side by side.

Each arm is built exactly as ``polytask study run`` builds it (its configs and overrides), fed one
real training batch of its datamodule, and timed over the same number of steps (forward, the
module's loss, backward, an Adam step). The arms are timed interleaved (round-robin, after one
warm-up step each), so the ratios to the first arm come from one run on one machine state.

    python benchmarks/study_step_times.py configs/studies/etr_nlp_synthscenes_claims.yaml
    python benchmarks/study_step_times.py configs/studies/etr_nlp_digits_claims.yaml --steps 7 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import torch

from polytask.config import instantiate
from polytask.study.spec import load_study
from polytask.training import MultiTaskModule
from polytask.utils.host_memory import keep_freed_memory


@dataclass
class Timed:
    """One arm under timing: its module, one batch, an optimizer and the step times so far."""

    module: MultiTaskModule
    batch: object
    optimizer: torch.optim.Optimizer
    learnable: int
    times: list[float] = field(default_factory=list)

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        start = time.perf_counter()
        loss = self.module.training_step(self.batch, 0)
        if isinstance(loss, dict):
            loss = loss["loss"]
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def build(study_file: str, arms: list[str] | None) -> dict[str, Timed]:
    """Every (selected) arm of the study, built as the study runner builds it."""
    study = load_study(study_file)
    timed = {}
    for name, arm in study.arms.items():
        if arms and name not in arms:
            continue
        cli = instantiate(arm.configs, [*arm.overrides, "--trainer.logger=false"])
        datamodule, module = cli.datamodule, cli.model
        datamodule.prepare_data()
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        module.train()
        learnable = sum(p.numel() for p in module.net.parameters() if p.requires_grad)
        timed[name] = Timed(module, batch, torch.optim.Adam(module.parameters(), 1e-3), learnable)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="a study file (configs/studies/*.yaml)")
    parser.add_argument("--arms", nargs="*", help="time only these arms (the first is the ratio's reference)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    keep_freed_memory()  # as the polytask command does (polytask.utils.host_memory)
    torch.set_num_threads(args.threads)
    timed = build(args.study, args.arms)
    for arm in timed.values():
        arm.step()
    for _ in range(args.steps):
        for arm in timed.values():
            arm.times.append(arm.step())
    medians = {name: statistics.median(arm.times) for name, arm in timed.items()}
    reference = next(iter(medians))
    print(f"{args.study}: {args.steps} steps per arm, interleaved, {args.threads} torch thread(s)")
    print(f"| arm | learnable params M | step ms (median) | / {reference} |")
    print("|---|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {timed[name].learnable / 1e6:.3f} | {median * 1000:.0f} | {median / medians[reference]:.2f} |")


if __name__ == "__main__":
    main()
