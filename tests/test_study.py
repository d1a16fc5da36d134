"""polytask study: paired statistics against hand-computed values, and a real 2-arm x 2-seed study
that is interrupted, resumes, and reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env
from polytask.cli import main
from polytask.cli.study import main as study_main
from polytask.metrics import delta_m
from polytask.study.report import load_runs, write_report
from polytask.study.runner import run_study
from polytask.study.spec import StudyError, load_study, parse_study, run_folder
from polytask.study.stats import summarize_seeds


def test_summarize_two_seeds_by_hand() -> None:
    # values +10 and -5: mean 2.5; sample std sqrt((7.5^2 + 7.5^2) / 1) = 10.6066;
    # bootstrap resamples of two values have means -5, 2.5, 2.5, 10 (each 1/4): the 2.5 % and
    # 97.5 % percentiles are -5 and 10; one seed of two has the mean's (positive) sign
    s = summarize_seeds([10.0, -5.0])
    assert s.n == 2
    assert s.mean == pytest.approx(2.5)
    assert s.std == pytest.approx(10.606601717798213)
    assert (s.ci_low, s.ci_high) == (pytest.approx(-5.0), pytest.approx(10.0))
    assert s.agree == 1


def test_summarize_edge_cases() -> None:
    one = summarize_seeds([3.0])
    assert one.mean == 3.0 and math.isnan(one.std) and math.isnan(one.ci_low) and one.agree == 1
    same = summarize_seeds([2.0, 2.0, 2.0])
    assert (same.std, same.ci_low, same.ci_high, same.agree) == (0.0, 2.0, 2.0, 3)
    # five seeds, all positive: the interval of the mean lies inside [min, max] and above 0
    five = summarize_seeds([1.0, 2.0, 3.0, 4.0, 5.0])
    assert five.mean == 3.0 and five.std == pytest.approx(math.sqrt(2.5)) and five.agree == 5
    assert 1.0 <= five.ci_low < 3.0 < five.ci_high <= 5.0
    with pytest.raises(ValueError, match="no values"):
        summarize_seeds([])


def _write_run(study_dir: Path, arm: str, seed: int, results: dict, wall: float = 10.0) -> None:
    folder = run_folder(study_dir, arm, seed)
    folder.mkdir(parents=True)
    directions = {"semseg": {"mIoU": True}, "depth": {"rmse": False}}
    (folder / "metrics.json").write_text(json.dumps({"split": "test", "results": results, "directions": directions}))
    record = {"status": "finished", "wall_s": wall, "cpu_s": 2 * wall, "params": {"learnable": 7, "frozen": 0},
              "global_step": 100, "threads": 1, "machine": {"processor": "x86_64", "cpus": 2}, "commit": "abc"}
    (folder / "run.json").write_text(json.dumps(record))
    curve = [{"step": 50, "epoch": 0, "train_loss": 1.0, "results": results}]
    (folder / "curve.json").write_text(json.dumps(curve))


def test_report_pairs_by_seed_hand_computed(tmp_path: Path) -> None:
    study = {"name": "hand", "seeds": [0, 1, 2], "reference": "ref", "split": "test", "directions": None,
             "arms": {"ref": {"configs": [], "overrides": []}, "new": {"configs": [], "overrides": []}}}
    (tmp_path / "study.json").write_text(json.dumps(study))
    # seed 0: mIoU 50 -> 55 (+10 %), rmse 2.0 -> 1.8 (-10 %, lower is better: +10 %) => +10 %
    # seed 1: mIoU 40 -> 38 (-5 %),  rmse 1.0 -> 1.1 (+10 %: -10 %)                   => -7.5 %
    # seed 2: only the reference finished -> not paired; the arm's seed 2 is "not finished"
    _write_run(tmp_path, "ref", 0, {"semseg": {"mIoU": 50.0}, "depth": {"rmse": 2.0}})
    _write_run(tmp_path, "ref", 1, {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 1.0}})
    _write_run(tmp_path, "ref", 2, {"semseg": {"mIoU": 45.0}, "depth": {"rmse": 1.5}})
    _write_run(tmp_path, "new", 0, {"semseg": {"mIoU": 55.0}, "depth": {"rmse": 1.8}})
    _write_run(tmp_path, "new", 1, {"semseg": {"mIoU": 38.0}, "depth": {"rmse": 1.1}})
    results = load_runs(tmp_path)
    s = results.deltas["new"]
    assert s.values == (pytest.approx(10.0), pytest.approx(-7.5))
    assert s.mean == pytest.approx(1.25)
    assert s.std == pytest.approx(12.374368670764582)  # |10 - (-7.5)| / sqrt(2)
    assert (s.ci_low, s.ci_high, s.agree) == (pytest.approx(-7.5), pytest.approx(10.0), 1)
    assert results.arms["new"].missing == [2]
    report = write_report(tmp_path).read_text()
    assert "| new | 2 | +1.25 ± 12.37 | [-7.50, +10.00] | 1 of 2 | +10.00, -7.50 |" in report
    assert "| semseg | mIoU ↑ | 45 ± 5 | 46.5 ± 12 |" in report
    assert "not finished: new seeds [2]" in report
    assert (tmp_path / "delta_m.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0

    # the other way round: ref against new; seed 0: (50 - 55) / 55 and -(2.0 - 1.8) / 1.8, seed 1: (40 - 38) / 38
    # and -(1.0 - 1.1) / 1.1, each the mean of the two tasks, in percent
    seed0 = ((50 - 55) / 55 - (2.0 - 1.8) / 1.8) / 2 * 100
    seed1 = ((40 - 38) / 38 - (1.0 - 1.1) / 1.1) / 2 * 100
    assert (seed0, seed1) == (pytest.approx(-10.1010101), pytest.approx(7.1770335))
    report = write_report(tmp_path, [("ref", "new")]).read_text()
    mean, std = (seed0 + seed1) / 2, abs(seed0 - seed1) / 2**0.5
    row = f"| ref vs new | 2 | {mean:+.2f} ± {std:.2f} | [{seed0:+.2f}, {seed1:+.2f}] | 1 of 2 | {seed0:+.2f}, {seed1:+.2f} |"
    assert "## Other paired comparisons" in report and row in report
    with pytest.raises(StudyError, match=r"comparison new:nope: unknown arm\(s\) \['nope'\]"):
        write_report(tmp_path, [("new", "nope")])
    assert study_main(["report", str(tmp_path), "--compare", "ref-new"]) == 2


def test_study_file_errors_name_the_field(tmp_path: Path) -> None:
    source = tmp_path / "s.yaml"
    base = {"seeds": [0], "reference": "a", "arms": {"a": {}}}
    with pytest.raises(StudyError, match="reference must name one of the arms"):
        parse_study({**base, "reference": "b"}, source)
    with pytest.raises(StudyError, match="seeds must be distinct"):
        parse_study({**base, "seeds": [1, 1]}, source)
    with pytest.raises(StudyError, match="config 'nope.yaml' not found"):
        parse_study({**base, "arms": {"a": {"configs": ["nope.yaml"]}}}, source)
    with pytest.raises(StudyError, match="unknown field"):
        parse_study({**base, "arm": {}}, source)
    study = parse_study({**base, "arms": {"a": {"overrides": {"trainer.max_steps": 5, "x.flag": True, "y": [1, 2]}}}},
                        source)
    assert study.arms["a"].overrides == ("--trainer.max_steps=5", "--x.flag=true", "--y=[1, 2]")


STUDY = """
name: tiny
seeds: [0, 1]
reference: hard
split: val
directions: {{parity: {{accuracy: true}}, compare: {{accuracy: true}}}}
common:
  configs: [{repo}/configs/hard_sharing_digits.yaml]
  overrides:
    trainer.max_steps: 6
    trainer.val_check_interval: 3
    trainer.limit_val_batches: 2
    trainer.num_sanity_val_steps: 0
    data.init_args.num_train: 64
    data.init_args.num_val: 64
    data.init_args.batch_size: 8
arms:
  hard: {{}}
  single:
    configs: [{repo}/configs/single_task_digits.yaml]
    overrides:
      trainer.callbacks+: {{class_path: _study_interrupt.ExitOnceAtStep, init_args: {{step: 3, marker: {marker}}}}}
"""


def test_study_runs_resumes_after_interruption_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])  # the workers import _study_interrupt
    marker = tmp_path / "interrupted"
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(STUDY.format(repo=REPO, marker=marker))
    study = load_study(study_file)
    out = tmp_path / "out"

    first = run_study(study, out, jobs=2, threads=1, checkpoint_every=2)
    status = {(o.arm, o.seed): o.status for o in first}
    # the single arm's seed 0 is killed at step 3 (after the step-2 checkpoint); seed 1 then runs through
    assert status == {("hard", 0): "finished", ("single", 0): "crashed", ("hard", 1): "finished",
                      ("single", 1): "finished"}
    assert marker.exists()
    interrupted = run_folder(out, "single", 0)
    assert json.loads((interrupted / "run.json").read_text())["status"] == "running"
    finished_before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")}

    assert main(["study", "run", str(study_file), "--out", str(out), "--threads", "1", "--checkpoint-every", "2"]) == 0
    record = json.loads((interrupted / "run.json").read_text())
    assert record["status"] == "finished" and record["global_step"] == 6
    assert [a["resumed_from_step"] for a in record["attempts"]] == [None, 2]
    for path, mtime in finished_before.items():  # finished runs are never rerun
        assert path.stat().st_mtime_ns == mtime
    curve = json.loads((interrupted / "curve.json").read_text())
    assert [e["step"] for e in curve] == [3, 6]
    for run in out.glob("runs/*/*"):
        names = {p.name for p in run.iterdir()}
        assert {"run.json", "run_spec.json", "config.yaml", "metrics.json", "curve.json"} <= names

    directions = {"parity": {"accuracy": True}, "compare": {"accuracy": True}}
    metrics = {(arm, seed): json.loads((run_folder(out, arm, seed) / "metrics.json").read_text())["results"]
               for arm in ("hard", "single") for seed in (0, 1)}
    expected = [delta_m(metrics["single", s], metrics["hard", s], directions) for s in (0, 1)]
    results = load_runs(out)
    assert results.deltas["single"].values == tuple(pytest.approx(v) for v in expected)
    report = (out / "report.md").read_text()
    assert "Runs finished: 4 of 4" in report and "| single | 2 |" in report


def test_changed_arm_is_refused(tmp_path: Path) -> None:
    study_file = tmp_path / "s.yaml"
    study_file.write_text(f"seeds: [0]\nreference: a\narms:\n  a: {{configs: [{REPO}/configs/hard_sharing_digits.yaml]}}\n")
    out = tmp_path / "out"
    folder = run_folder(out, "a", 0)
    folder.mkdir(parents=True)
    (folder / "run_spec.json").write_text(json.dumps({"configs": ["other.yaml"], "overrides": [], "split": "test"}))
    with pytest.raises(StudyError, match="changed the configs of arm 'a'"):
        run_study(load_study(study_file), out)
