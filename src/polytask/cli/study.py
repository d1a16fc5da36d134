"""``polytask study run STUDY.yaml`` and ``polytask study report STUDY_DIR``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from polytask.study.report import write_report
from polytask.study.runner import run_study
from polytask.study.spec import StudyError, load_study


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polytask study",
        description="Train the arms of a study over its seeds (resumable) and report paired comparisons.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train every arm x seed not yet finished, then write the report")
    run.add_argument("study", help="the study YAML file (see configs/studies/)")
    run.add_argument("--out", default=None, help="study folder (default: studies/<name>)")
    run.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, one process each")
    run.add_argument("--threads", type=int, default=None, help="torch threads of each run's process")
    run.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between resume checkpoints")
    run.add_argument("--arms", nargs="+", default=None, help="train only these arms")
    report = sub.add_parser("report", help="write report.md and the plots of a study folder")
    report.add_argument("study_dir", help="the folder 'study run' wrote")
    report.add_argument("--compare", action="append", default=[], metavar="ARM:BASELINE",
                        help="also Δm of ARM against BASELINE, paired by seed (repeatable), e.g. full:no_memory")
    return parser


def _comparisons(values: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        arm, sep, baseline = value.partition(":")
        if not sep or not arm or not baseline:
            raise StudyError(f"--compare {value!r}: expected ARM:BASELINE, two arm names separated by a colon")
        pairs.append((arm, baseline))
    return pairs


def main(args: Sequence[str]) -> int:
    """Entry point of ``polytask study``; 0 when every run finished, 1 otherwise."""
    ns = _parser().parse_args(list(args))
    try:
        if ns.command == "report":
            print(f"report written to {write_report(Path(ns.study_dir), _comparisons(ns.compare))}")
            return 0
        study = load_study(ns.study)
        out_dir = Path(ns.out or Path("studies") / study.name)
        outcomes = run_study(study, out_dir, ns.jobs, ns.threads, ns.checkpoint_every, ns.arms)
    except (StudyError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    crashed = [o for o in outcomes if o.status == "crashed"]
    print(f"{len(outcomes) - len(crashed)} of {len(outcomes)} runs finished; {len(crashed)} crashed")
    for o in crashed:
        print(f"  crashed: {o.arm} seed {o.seed}: {o.error}")
    try:
        print(f"report written to {write_report(out_dir)}")
    except StudyError as err:
        print(f"no report yet: {err}")
    return 1 if crashed else 0
