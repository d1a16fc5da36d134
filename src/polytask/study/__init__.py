"""Studies: arms x seeds trained resumably, compared paired by seed (``polytask study run/report``)."""

from polytask.study.report import load_runs, write_report
from polytask.study.runner import RunOutcome, run_study
from polytask.study.spec import Arm, Study, StudyError, load_study, parse_study
from polytask.study.stats import PairedSummary, paired_delta_m, summarize

__all__ = [
    "Arm",
    "PairedSummary",
    "RunOutcome",
    "Study",
    "StudyError",
    "load_runs",
    "load_study",
    "paired_delta_m",
    "parse_study",
    "run_study",
    "summarize",
    "write_report",
]
