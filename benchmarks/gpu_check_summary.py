"""Environment probe and summary writer of ``benchmarks/gpu_check.sh``.

Usage (the script calls both)::

    python benchmarks/gpu_check_summary.py env OUT_DIR --device cuda      # OUT_DIR/env.json; fails without CUDA
    python benchmarks/gpu_check_summary.py summary OUT_DIR --mode gpu --wall-s 512

``summary`` reads what the steps left in OUT_DIR (``steps.tsv``: one line per step, ``env.json``,
the junit XML of the tests, the ``polytask bench`` JSON reports, ``logs/``) and writes
``summary.json`` and ``summary.md``. A step that failed, timed out or was skipped is reported with
the end of its log; the summary is written whatever the steps did.

``summary.json``::

    {"mode": "gpu" | "dry-run", "wall_s", "written", "git": {"commit", "dirty"},
     "device": {"name", "torch", "cuda_version", "cuda_available", ...},      # from env.json
     "steps": [{"name", "status": "ok|failed|timeout|skipped", "rc", "wall_s", "limit_s", "output", "command", "log_tail"?}],
     "tests": {"total", "passed", "failed", "errors", "skipped", "failures": [ids], "skipped_reasons": {id: reason}},
     "benchmarks": {STEP: {"status", "model", "configs", "image_size", "batch_size", "device_name", "params_m",
                           "gflops_per_image", "variants": {key: {"median_ms", "samples_per_s", "peak_mem_mb"}},
                           "ratios", "skipped",
                           # --versus runs also:
                           "versus": {same fields of the other side}, "comparison": [{"key", "base_median_ms",
                           "versus_median_ms", "ratio"}], "versus_ratios": {"versus_over_base/KEY": ratio}}}}
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STEP_FIELDS = ("name", "rc", "wall_s", "limit_s", "status", "output", "command")
"""Columns of ``steps.tsv`` (tab-separated, written by gpu_check.sh's ``run_step``)."""
LOG_TAIL_LINES = 25


def probe_env(out_dir: Path, device: str) -> int:
    """Write ``env.json`` (Python, torch, CUDA, device name); exit status 1 when ``device`` is cuda and CUDA is absent."""
    import torch

    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device_name": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "device_count": torch.cuda.device_count(),
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "total_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
    }
    (out_dir / "env.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    if device == "cuda" and not cuda:
        print("CUDA is not available: run `bash benchmarks/gpu_check.sh --dry-run OUT_DIR` on a CPU machine", file=sys.stderr)
        return 1
    return 0


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The rows of ``steps.tsv``; numbers as ints (``rc`` is ``None`` for a skipped step)."""
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.strip():
            continue
        values = line.split("\t", len(STEP_FIELDS) - 1)
        row: dict[str, Any] = dict(zip(STEP_FIELDS, values + [""] * (len(STEP_FIELDS) - len(values))))
        for key in ("rc", "wall_s", "limit_s"):
            row[key] = int(row[key]) if row[key].lstrip("-").isdigit() else None
        steps.append(row)
    return steps


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log ('' when absent)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def junit_counts(path: Path) -> dict[str, Any]:
    """Totals of a pytest junit XML, the ids of failed tests and the reasons of skipped ones."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    failures: list[str] = []
    skipped: dict[str, str] = {}
    counts = {"total": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for case in suite.iter("testcase"):
            test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
            counts["total"] += 1
            if case.find("failure") is not None:
                counts["failed"] += 1
                failures.append(test_id)
            elif case.find("error") is not None:
                counts["errors"] += 1
                failures.append(test_id)
            elif (skip := case.find("skipped")) is not None:
                counts["skipped"] += 1
                skipped[test_id] = skip.get("message", "")
            else:
                counts["passed"] += 1
    return {**counts, "failures": failures, "skipped_reasons": skipped}


def _side(report: Mapping[str, Any]) -> dict[str, Any]:
    """The key numbers of one side of a ``polytask bench`` report (its first device)."""
    devices = report.get("devices") or [{}]
    device = devices[0]
    summary = report.get("summary") or {}
    return {
        "model": report.get("model"),
        "configs": report.get("configs"),
        "image_size": report.get("image_size"),
        "batch_size": report.get("batch_size"),
        "device_name": device.get("device_name"),
        "params_m": summary["total_params"] / 1e6 if "total_params" in summary else None,
        "gflops_per_image": summary.get("gflops"),
        "variants": {
            r["key"]: {"median_ms": r["median_ms"], "samples_per_s": r["samples_per_s"], "peak_mem_mb": r["peak_mem_mb"]}
            for r in device.get("results", [])
        },
        "ratios": device.get("ratios", {}),
        "skipped": {**report.get("skipped", {}), **device.get("skipped", {})},
    }


def bench_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """Key numbers of a ``polytask bench`` JSON report; with ``--versus`` also the other side and the ratios."""
    out = _side(report)
    versus = report.get("versus")
    if versus is not None:
        out["versus"] = _side(versus)
        out["comparison"] = list(versus.get("comparison", []))
        out["versus_ratios"] = dict(versus.get("ratios", {}))
    return out


def _git() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]

    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def build_summary(out_dir: Path, mode: str, wall_s: float) -> dict[str, Any]:
    """The summary of a gpu_check run from the files in ``out_dir``."""
    steps = read_steps(out_dir / "steps.tsv")
    env_path = out_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    summary: dict[str, Any] = {
        "mode": mode,
        "wall_s": wall_s,
        "written": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git": _git(),
        "device": {"name": env.get("device_name"), **env},
        "steps": [],
        "tests": None,
        "benchmarks": {},
        "tables": {},
    }
    for step in steps:
        if step["status"] != "ok":
            step["log_tail"] = log_tail(out_dir / "logs" / f"{step['name']}.log")
        summary["steps"].append(step)
        output = out_dir / step["output"] if step["output"] else None
        if step["name"] == "tests":
            try:
                summary["tests"] = junit_counts(output) if output is not None and output.exists() else None
            except ET.ParseError as err:
                summary["tests"] = {"error": f"unreadable junit XML: {err}"}
        elif step["name"].startswith("bench"):
            entry: dict[str, Any] = {"status": step["status"], "json": step["output"]}
            if output is not None and output.exists():
                try:
                    entry.update(bench_summary(json.loads(output.read_text())))
                except (ValueError, KeyError, TypeError) as err:
                    entry["error"] = f"unreadable report: {type(err).__name__}: {err}"
            summary["benchmarks"][step["name"]] = entry
        elif output is not None and output.suffix == ".md" and output.exists():
            summary["tables"][step["name"]] = output.read_text()
    return summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _variant_table(side: Mapping[str, Any]) -> list[str]:
    lines = ["| variant | median ms | images/s | peak MiB |", "|---|---|---|---|"]
    for key, v in side.get("variants", {}).items():
        lines.append(f"| {key} | {_ms(v['median_ms'])} | {v['samples_per_s']:.2f} | {_ms(v['peak_mem_mb'])} |")
    return lines


def _side_header(side: Mapping[str, Any]) -> str:
    size = "x".join(str(s) for s in side.get("image_size") or []) or "?"
    params = "?" if side.get("params_m") is None else f"{side['params_m']:.1f} M params"
    gflops = "?" if side.get("gflops_per_image") is None else f"{side['gflops_per_image']:.1f} GFLOPs/image"
    return f"{side.get('model')} ({', '.join(side.get('configs') or [])}): {size}, batch {side.get('batch_size')}, {params}, {gflops}"


def render_markdown(summary: Mapping[str, Any]) -> str:
    """``summary.md``: steps, tests, and every benchmark's numbers and ratios."""
    device = summary["device"]
    git = summary.get("git") or {}
    lines = [
        f"# GPU check ({summary['mode']})",
        "",
        f"- device: {device.get('name')}; torch {device.get('torch')} (CUDA build {device.get('cuda_version')}, "
        f"CUDA available: {device.get('cuda_available')})",
        f"- commit: {git.get('commit')}{' (with uncommitted changes)' if git.get('dirty') else ''}",
        f"- wall time: {summary['wall_s']:.0f} s; written {summary['written']}",
        "",
        "## Steps",
        "",
        "| step | status | rc | wall s | limit s |",
        "|---|---|---|---|---|",
    ]
    for step in summary["steps"]:
        lines.append(f"| {step['name']} | {step['status']} | {step['rc']} | {step['wall_s']} | {step['limit_s']} |")
    for step in summary["steps"]:
        if step.get("log_tail"):
            lines += ["", f"`{step['name']}` ({step['status']}), end of logs/{step['name']}.log:", "", "```", step["log_tail"], "```"]
    lines += ["", "## Tests", ""]
    tests = summary.get("tests")
    if not tests:
        lines.append("no junit XML (see the tests step)")
    elif "error" in tests:
        lines.append(tests["error"])
    else:
        lines.append(
            f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
            f"({tests['total']} selected)"
        )
        lines += [f"- FAILED {t}" for t in tests["failures"]]
        reasons = sorted(set(tests["skipped_reasons"].values()))
        lines += [f"- skipped: {r}" for r in reasons[:5]]
    for name, bench in summary["benchmarks"].items():
        lines += ["", f"## {name} ({bench['status']})", ""]
        if "variants" not in bench:
            lines.append(bench.get("error", "no report"))
            continue
        lines += [f"{_side_header(bench)}; {bench.get('device_name')}", ""] + _variant_table(bench)
        if bench.get("ratios"):
            lines += ["", "| ratio (same run) | value |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in bench["ratios"].items()]
        if "versus" in bench:
            lines += ["", f"versus: {_side_header(bench['versus'])}", ""] + _variant_table(bench["versus"])
            lines += ["", "| variant | base ms | versus ms | versus / base |", "|---|---|---|---|"]
            for row in bench["comparison"]:
                lines.append(f"| {row['key']} | {_ms(row['base_median_ms'])} | {_ms(row['versus_median_ms'])} | {row['ratio']:.3f} |")
        if bench.get("skipped"):
            lines += [""] + [f"- skipped {k}: {v}" for k, v in bench["skipped"].items()]
    for name, table in summary.get("tables", {}).items():
        lines += ["", f"## {name}", "", table.rstrip()]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, mode: str, wall_s: float) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary.md`` into ``out_dir``; returns the summary."""
    summary = build_summary(out_dir, mode, wall_s)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(render_markdown(summary))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="write OUT_DIR/env.json")
    env.add_argument("out_dir", type=Path)
    env.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    summary = sub.add_parser("summary", help="write OUT_DIR/summary.json and summary.md")
    summary.add_argument("out_dir", type=Path)
    summary.add_argument("--mode", choices=("gpu", "dry-run"), required=True)
    summary.add_argument("--wall-s", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command == "env":
        return probe_env(args.out_dir, args.device)
    write_summary(args.out_dir, args.mode, args.wall_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
