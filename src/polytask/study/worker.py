"""One run of a study, in its own process: train (resuming if a checkpoint exists), score, record.

``python -m polytask.study.worker RUN_DIR`` reads ``RUN_DIR/run_spec.json`` (written by
:func:`polytask.study.runner.run_study`) and leaves in ``RUN_DIR``:

* ``run.json``: status (``running``, ``finished``, ``crashed``), seed, arm, the code's commit,
  wall and CPU seconds of every attempt, learnable and frozen parameters, the last global step;
* ``config.yaml``: the fully resolved configuration of the run;
* ``curve.json``: the validation metrics (and the last training loss) at every validation;
* ``metrics.json``: the final weights' metrics on the study's split and the Delta_m directions;
* ``checkpoints/last.ckpt``: the resume point (not a result file; ``.gitignore`` excludes it).

Everything a report needs is in these small files, so a study can be re-reported later without
its checkpoints.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_only

from polytask.training.checkpoint import ResumableCheckpoint
from polytask.utils.files import write_json_atomic
from polytask.utils.host_memory import host_malloc_state, keep_freed_memory

CHECKPOINT_DIR = "checkpoints"


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON content of ``path``, or ``default`` when the file does not exist."""
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def code_version() -> dict[str, Any]:
    """The git commit of the polytask source that runs, and whether tracked files differ from it."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (data-loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CurveRecorder(pl.Callback):
    """Append the validation metrics of every validation during ``fit`` to ``curve.json``.

    Each entry: ``{"step", "epoch", "train_loss", "results": {task: {metric: value}}}``. After a
    resume, entries from the interrupted attempt at or beyond the resumed step are replaced. Runs
    on rank 0 only and calls no collective.

    Args:
        path: the JSON file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        results = getattr(pl_module, "results", {}).get("val")
        if not results:
            return
        step = int(trainer.global_step)
        loss = trainer.callback_metrics.get("train/loss")
        curve = [e for e in read_json(self.path, []) if e["step"] < step]
        curve.append({
            "step": step, "epoch": int(trainer.current_epoch),
            "train_loss": None if loss is None else float(loss), "results": results,
        })
        write_json_atomic(self.path, curve)


def study_callbacks(callbacks: Sequence[pl.Callback], run_dir: Path, every_n_steps: int) -> list[pl.Callback]:
    """The config's callbacks without its checkpointing and progress bars, plus the study's own:
    a checkpoint every ``every_n_steps`` in ``run_dir/checkpoints`` and the :class:`CurveRecorder`."""
    kept = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, ProgressBar))]
    checkpoint = ResumableCheckpoint(
        dirpath=str(run_dir / CHECKPOINT_DIR), save_last=True, save_top_k=0, every_n_train_steps=every_n_steps
    )
    return [*kept, checkpoint, CurveRecorder(run_dir / "curve.json")]


def parameter_counts(net: torch.nn.Module) -> dict[str, int]:
    """Learnable parameters, and frozen ones (parameters without gradient plus non-statistics buffers)."""
    learnable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    frozen += sum(b.numel() for name, b in net.named_buffers()
                  if not name.endswith(("running_mean", "running_var", "num_batches_tracked")))
    return {"learnable": learnable, "frozen": frozen}


def _record(run_dir: Path, payload: Mapping[str, Any]) -> None:
    write_json_atomic(run_dir / "run.json", dict(payload))


def train_and_score(run_dir: Path, spec: Mapping[str, Any], record: dict[str, Any]) -> None:
    """Build the run's configuration, fit (resuming from ``checkpoints/last.ckpt`` if present),
    score the final weights on the study's split and write ``metrics.json``."""
    from polytask.config import instantiate

    overrides = [
        *spec["overrides"],
        f"--seed_everything={spec['seed']}",
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.logger=false",
        "--trainer.enable_model_summary=false",
    ]
    cli = instantiate(spec["configs"], overrides)
    (run_dir / "config.yaml").write_text(cli.parser.dump(cli.config, skip_none=False), encoding="utf-8")
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    trainer.callbacks[:] = study_callbacks(trainer.callbacks, run_dir, spec["checkpoint_every"])
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    record["params"] = parameter_counts(model.net)
    attempt = record["attempts"][-1]
    attempt["resumed_from_step"] = None
    if last.is_file():
        attempt["resumed_from_step"] = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
    _record(run_dir, record)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    record["global_step"] = int(trainer.global_step)
    score = trainer.test if spec["split"] == "test" else trainer.validate
    score(model, datamodule=datamodule, verbose=False)
    results = model.results[spec["split"]]
    directions = {t.name: dict(t.higher_is_better) for t in model.tasks}
    write_json_atomic(run_dir / "metrics.json", {"split": spec["split"], "results": results, "directions": directions})


def run(run_dir: Path) -> int:
    """Carry out the run of ``run_dir``; 0 when it finished, 1 when it crashed (``run.json`` says why)."""
    spec = read_json(run_dir / "run_spec.json")
    if spec is None:
        raise FileNotFoundError(f"{run_dir / 'run_spec.json'} is missing; runs are prepared by 'polytask study run'")
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    previous = read_json(run_dir / "run.json", {})
    attempts = list(previous.get("attempts", []))
    record: dict[str, Any] = {
        "status": "running", "arm": spec["arm"], "seed": spec["seed"], "study": spec["study"],
        **code_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": {"node": platform.node(), "processor": platform.machine(), "cpus": os.cpu_count()},
        "host_malloc": host_malloc_state(),
        "attempts": attempts,
    }
    attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    attempts.append(attempt)
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()

    def close(status: str) -> None:
        attempt["wall_s"] = round(time.perf_counter() - start_wall, 2)
        attempt["cpu_s"] = round(cpu_seconds() - start_cpu, 2)
        record["status"] = status
        record["wall_s"] = round(sum(a.get("wall_s", 0.0) for a in attempts), 2)
        record["cpu_s"] = round(sum(a.get("cpu_s", 0.0) for a in attempts), 2)
        _record(run_dir, record)

    try:
        train_and_score(run_dir, spec, record)
    except Exception as err:  # noqa: BLE001 - a crashed run is reported, the study goes on
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()[-4000:]
        close("crashed")
        print(record["traceback"], file=sys.stderr)
        return 1
    close("finished")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m polytask.study.worker RUN_DIR``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m polytask.study.worker RUN_DIR", file=sys.stderr)
        return 2
    keep_freed_memory()
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
