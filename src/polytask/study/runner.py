"""``polytask study run``: train every arm x seed of a study, each in its own process, resumably.

A run whose ``run.json`` says ``finished`` (and which has its ``metrics.json``) is never rerun; an
interrupted one resumes from its last checkpoint; a crashed one is reported, the others go on,
and the next ``study run`` tries it again. Runs go in ``--jobs`` parallel processes, each
limited to ``--threads`` threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from polytask.study.spec import Study, StudyError, arm_seed_pairs, run_folder
from polytask.study.worker import read_json
from polytask.utils.files import write_json_atomic

GITIGNORE = (
    "# written by polytask study run: checkpoints are resume points, not results; the run folders\n"
    "# hold the small result files a report is rebuilt from (re-included if a parent ignores runs/)\n"
    "checkpoints/\n!runs/\n"
)


@dataclass(frozen=True)
class RunOutcome:
    """What became of one run: ``finished`` (now or before), ``crashed`` (with the error), or ``skipped``."""

    arm: str
    seed: int
    status: str
    error: str | None = None


def run_spec(study: Study, arm: str, seed: int, threads: int | None, checkpoint_every: int) -> dict:
    """The plain description of one run that its worker reads (``run_spec.json``)."""
    return {
        "study": study.name, "arm": arm, "seed": seed, "split": study.split,
        "configs": list(study.arms[arm].configs), "overrides": list(study.arms[arm].overrides),
        "threads": threads, "checkpoint_every": checkpoint_every,
    }


def is_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished (``run.json`` says so and ``metrics.json`` exists)."""
    record = read_json(run_dir / "run.json", {})
    return record.get("status") == "finished" and (run_dir / "metrics.json").is_file()


def check_unchanged(run_dir: Path, spec: dict) -> None:
    """Refuse to continue a run whose arm was changed in the study file since the run started.

    Raises:
        StudyError: the recorded configs, overrides or split differ from the study's.
    """
    old = read_json(run_dir / "run_spec.json")
    if old is None:
        return
    keys = ("configs", "overrides", "split")
    changed = [k for k in keys if old.get(k) != spec[k]]
    if changed:
        raise StudyError(
            f"{run_dir}: the study file changed the {', '.join(changed)} of arm {spec['arm']!r} since this run "
            f"started (recorded {[old.get(k) for k in changed]}, now {[spec[k] for k in changed]}); "
            "restore the study file, or delete the run folder to train it again"
        )


def launch(run_dir: Path, threads: int | None, python: str) -> int:
    """Run the worker of ``run_dir`` in a new process (output appended to ``log.txt``); its exit code."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    with open(run_dir / "log.txt", "a", encoding="utf-8") as log:
        return subprocess.run([python, "-m", "polytask.study.worker", str(run_dir)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode


def run_study(
    study: Study,
    out_dir: Path,
    jobs: int = 1,
    threads: int | None = None,
    checkpoint_every: int = 50,
    arms: Sequence[str] | None = None,
    python: str = sys.executable,
) -> list[RunOutcome]:
    """Train every run of ``study`` not yet finished into ``out_dir/runs/<arm>/seed<k>``.

    Args:
        study: the parsed study.
        out_dir: the study folder (created; ``study.json`` there describes the study for the report).
        jobs: runs trained at the same time, each in its own process.
        threads: torch threads of each run's process (None: torch's default).
        checkpoint_every: optimizer steps between resume checkpoints.
        arms: only these arms (default: all).
        python: interpreter of the worker processes.

    Returns:
        One :class:`RunOutcome` per run, in study order.

    Raises:
        StudyError: an unknown arm, or a run folder whose recorded arm differs from the study file.
    """
    if jobs < 1:
        raise StudyError(f"jobs must be >= 1, got {jobs}")
    selected = list(arms or study.arms)
    unknown = [a for a in selected if a not in study.arms]
    if unknown:
        raise StudyError(f"{study.source}: unknown arm(s) {unknown}; arms: {list(study.arms)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "study.json", study.as_dict())
    (out_dir / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
    pairs = [(a, s) for a, s in arm_seed_pairs(study) if a in selected]
    specs = {}
    for arm, seed in pairs:
        spec = run_spec(study, arm, seed, threads, checkpoint_every)
        check_unchanged(run_folder(out_dir, arm, seed), spec)
        specs[arm, seed] = spec
    lock = threading.Lock()

    def one(pair: tuple[str, int]) -> RunOutcome:
        arm, seed = pair
        run_dir = run_folder(out_dir, arm, seed)
        if is_finished(run_dir):
            return RunOutcome(arm, seed, "finished")
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run_spec.json", specs[pair])
        with lock:
            print(f"[study {study.name}] start {arm} seed {seed} -> {run_dir}", flush=True)
        code = launch(run_dir, threads, python)
        record = read_json(run_dir / "run.json", {})
        if code == 0 and is_finished(run_dir):
            outcome = RunOutcome(arm, seed, "finished")
        else:
            error = record.get("error") or f"worker exited with code {code}; see {run_dir / 'log.txt'}"
            outcome = RunOutcome(arm, seed, "crashed", error)
        with lock:
            took = f" in {record.get('wall_s', 0):.0f} s" if outcome.status == "finished" else f": {outcome.error}"
            print(f"[study {study.name}] {outcome.status} {arm} seed {seed}{took}", flush=True)
        return outcome

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, pairs))
