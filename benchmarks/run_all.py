"""Run ``polytask bench`` on every config in configs/ and on the target checks; write benchmarks/RESULTS.md.

Every benchmark runs in its own process (``polytask bench`` with ``--json``), one after the other.
Two sections of RESULTS.md are (re)written, the other sections are kept:

* ``## polytask bench (CPU)``: one row per config of ``configs/`` (layered configs on top of their
  base, see :func:`polytask.profiling.experiment.config_chain`), at the config's resolution or, above
  ``--max-pixels``, at a reduced one (the table says so);
* ``## polytask bench targets (CPU)``: the measurements behind the speed targets (TaskExpert vs its
  bare ViT-S/16 at 224x224; ETR-NLP batched vs per-task with 4 and more tasks; loader vs training
  samples/s on SynthScenes and on NYUD fixture files).

Usage::

    python benchmarks/run_all.py                       # everything, ~1-2 h on 2 cores
    python benchmarks/run_all.py --only taskexpert     # configs whose path contains a pattern
    python benchmarks/run_all.py --skip-configs        # targets only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polytask.profiling.experiment import benchmark_configs, config_chain

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
CONFIG_SECTION = "## polytask bench (CPU)"
TARGET_SECTION = "## polytask bench targets (CPU)"
BENCH = "import sys; from polytask.cli.bench import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class Run:
    """One ``polytask bench`` invocation and its report.

    Attributes:
        name: row label.
        args: bench arguments (``--json`` is added).
        report: the JSON report, or ``None`` when the run failed or measured nothing.
        error: the failure (last lines of the output) or skip reason.
        seconds: wall time of the run.
    """

    name: str
    args: list[str]
    report: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    command: str = field(default="")


def _with_json(args: Sequence[str], out: Path) -> list[str]:
    """``args`` with ``--json out`` placed before the ``--`` that starts the config overrides."""
    split = list(args).index("--") if "--" in args else len(args)
    return [*args[:split], "--json", str(out), *args[split:]]


def run_bench(name: str, args: Sequence[str], json_dir: Path, timeout: float, env: Mapping[str, str]) -> Run:
    """Run ``polytask bench args`` in a fresh process and read its JSON report."""
    out = json_dir / f"{name.replace('/', '_')}.json"
    out.unlink(missing_ok=True)
    run = Run(name, list(args), command="polytask bench " + " ".join(args))
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", BENCH, *_with_json(args, out)],
            cwd=REPO, env=dict(env), capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        run.error = f"timed out after {timeout:.0f} s"
        return run
    finally:
        run.seconds = time.perf_counter() - start
    report = json.loads(out.read_text()) if out.exists() else None
    if done.returncode == 0 and report is not None:
        run.report = report
    elif report is not None and "bench" in report.get("skipped", {}):
        run.error = "skipped: " + report["skipped"]["bench"]
    else:
        run.error = "failed: " + " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
    print(f"{name}: {'ok' if run.report else run.error} ({run.seconds:.0f} s)", flush=True)
    return run


def _result(report: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    return next((r for r in report["devices"][0]["results"] if r["key"] == key), None)


def _ms(report: Mapping[str, Any], key: str) -> str:
    row = _result(report, key)
    return "-" if row is None else f"{row['median_ms']:.0f}"


def _ratio(report: Mapping[str, Any], key: str) -> str:
    value = report["devices"][0]["ratios"].get(key)
    return "-" if value is None else f"{value:.2f}"


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_row(run: Run) -> str:
    """One markdown table row of the per-config section."""
    if run.report is None:
        return f"| {run.name} | | | | | | | | | | | | | | {_short(str(run.error), 160)} |"
    r = run.report
    h, w = r["image_size"]
    size = f"{h}x{w}" + (" (reduced)" if r.get("full_image_size") else "")
    loader = r["loader"]
    notes = [n for n in r["notes"] if n.startswith(("reduced", "resolution"))]
    if "--data.init_args.root" in run.args:
        notes.append("data: fixture files (tests/fixtures_data.py)")
    if r["inputs"] != "loader batch":
        notes.append(f"inputs: {r['inputs']}")
    notes += [f"{k} skipped: {_short(v, 70)}" for k, v in r["skipped"].items()]
    notes += [f"{k} skipped: {_short(v, 70)}" for k, v in r["devices"][0]["skipped"].items() if k != "per_task"]
    train = _result(r, "model/fp32/eager/train")
    return "| " + " | ".join([
        run.name,
        r["model"],
        str(len(r["tasks"])),
        f"{size}, {r['batch_size']}",
        f"{r['summary']['total_params'] / 1e6:.1f}",
        f"{r['summary']['gflops']:.2f}",
        _ms(r, "model/fp32/eager/train"),
        _ms(r, "model/bf16/eager/train"),
        _ms(r, "model/fp32/eager/infer"),
        _ratio(r, "model_over_bare/fp32/eager/train"),
        _ratio(r, "per_task_over_batched/fp32/eager/infer"),
        _ratio(r, "bf16_over_fp32/model/eager/train"),
        "-" if train is None else f"{train['peak_mem_mb']:.0f}",
        "-" if loader is None else f"{loader['samples_per_s']:.0f} ({_ratio(r, 'loader_over_train_samples_per_s')}x)",
        "; ".join(notes),
    ]) + " |"


CONFIG_HEADER = (
    "| config | model | T | size, batch | params M | GFLOPs/img | train ms fp32 | train ms bf16 | infer ms fp32 "
    "| model / bare train | per-task / batched infer | bf16 / fp32 train | peak MiB train | loader samples/s (x train) | notes |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def machine_line(runs: Sequence[Run]) -> str:
    """CPU, threads and load averages seen by the runs."""
    loads = [r.report["load_average"][0] for r in runs if r.report]
    threads = sorted({r.report["threads"] for r in runs if r.report})
    torch_versions = sorted({r.report["torch"] for r in runs if r.report})
    load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
    return (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {', '.join(torch_versions)}, "
        f"{', '.join(map(str, threads))} torch thread(s) per run; 1-minute load average during the runs {load} "
        "(the machine was shared: absolute times are noisy, the ratios are taken within one run)."
    )


def config_section(runs: Sequence[Run], options: argparse.Namespace) -> str:
    """The markdown of the per-config section."""
    lines = [
        CONFIG_SECTION,
        "",
        f"Written by `python benchmarks/run_all.py` on {time.strftime('%Y-%m-%d')}. Each row is "
        f"`polytask bench --config ... --batch-size {options.batch_size} --max-pixels {options.max_pixels} "
        "--fallback-image-size 128 160 "
        f"--modes fp32,bf16 --steps {options.steps} --warmup {options.warmup} --threads {options.threads} "
        "--device cpu` (layered configs on top of the base config their header names). Times are medians "
        "of interleaved runs; ratios are of times (above 1: the first is slower). `model / bare`: the network "
        "against its backbone with Conv1x1 heads. Sizes above the pixel budget are reduced (aspect kept); "
        "peak memory is tensor memory allocated by one training step above what is held before it "
        "(gradients included, parameters and optimizer state not). Pretrained weights are never loaded.",
        "",
        machine_line(runs),
        "",
        CONFIG_HEADER,
        *(config_row(r) for r in runs),
        "",
    ]
    return "\n".join(lines)


@dataclass
class Target:
    """A target check: the bench runs it needs and how to judge them."""

    title: str
    runs: list[tuple[str, list[str]]]
    judge: Callable[[Mapping[str, Run]], list[str]]


def _fixture_writers() -> dict[str, Callable[[Path], object]]:
    """The tests' fixture writers (tests/fixtures_data.py) by datamodule class name, for datamodules that
    need their files even to tell their tasks (CelebA, folder datasets)."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_data import write_celeba, write_folder

    return {"CelebADataModule": lambda root: write_celeba(root, n=24), "FolderDataModule": write_folder}


def _data_class(chain: Sequence[Path]) -> str | None:
    """Class name of the datamodule set by the last config of ``chain`` that sets one."""
    names = [((yaml.safe_load(c.read_text()) or {}).get("data") or {}).get("class_path") for c in chain]
    named = [n for n in names if n]
    return named[-1].rpartition(".")[2] if named else None


def _nyud_fixture(root: Path) -> Path:
    """NYUD_MT fixture files (atrc version) at the full 480x640 size, written by the tests' fixture writer."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_data import write_nyud

    write_nyud(root, version="atrc", shape=(480, 640), n_train=24, n_val=2)
    return root


def _profile_lines(report: Mapping[str, Any], keys: Sequence[str], count: int = 6) -> list[str]:
    """Markdown lines with the operators of most self time of the variants ``keys`` (``--profile``)."""
    profiles = report["devices"][0].get("profiles", {})
    lines = []
    for key in keys:
        rows = profiles.get(key, [])[:count]
        if rows:
            ops = ", ".join(f"`{r['op']}` {r['self_ms']:.0f} ms ({r['calls']}x)" for r in rows)
            lines.append(f"  - profile of `{key}` (self time, one call): {ops}")
    return lines


def _measured(runs: Mapping[str, Run], lines: list[str]) -> Iterator[tuple[str, Run]]:
    """The runs that produced a report; a line naming the failure of each other run goes to ``lines``."""
    for name, run in runs.items():
        if run.report is None:
            lines.append(f"- `{name}`: {run.error}")
        else:
            yield name, run


def _verdict(value: float, target: float, at_most: bool) -> str:
    """`` (target <= 1.15: met)`` or `` (target >= 2: missed by 12%)``; ``at_most``: lower is better."""
    met = value <= target if at_most else value >= target
    shortfall = value / target - 1 if at_most else 1 - value / target
    return f" (target {'<=' if at_most else '>='} {target:g}: " + ("met)" if met else f"missed by {shortfall:.0%})")


def targets(nyud_root: Path, threads: int) -> list[Target]:
    """The target checks of the issue, with the bench arguments that measure them."""
    common = ["--threads", str(threads), "--device", "cpu"]
    vit_s = [
        "--config", "configs/taskexpert_pascal_vitb.yaml", "--image-size", "224", "224", "--batch-size", "2",
        "--modes", "fp32,bf16", "--steps", "7", "--warmup", "2", "--loader-batches", "0", "--profile", "8", *common,
        "--", "--model.init_args.net.init_args.backbone", "vit_small_patch16_224",
        "--model.init_args.net.init_args.width", "128", "--model.init_args.net.init_args.head_channels", "null",
    ]

    def judge_vit(runs: Mapping[str, Run]) -> list[str]:
        lines = []
        for name, run in _measured(runs, lines):
            ratios = run.report["devices"][0]["ratios"]
            for key in sorted(k for k in ratios if k.startswith(("model_over_bare", "compiled_over_eager"))):
                verdict = ""
                if key.startswith("model_over_bare") and key.endswith("/train"):
                    verdict = _verdict(ratios[key], 1.15, at_most=True)
                lines.append(f"- `{name}` {key}: **{ratios[key]:.3f}**{verdict}")
                if "missed" in verdict:
                    variant = key.split("/", 1)[1]
                    lines += _profile_lines(run.report, [f"model/{variant}", f"bare/{variant}"])
        return lines

    etr = ["--config", "configs/etr_nlp_synthscenes.yaml", "--modes", "fp32", "--steps", "7", "--warmup", "2", "--profile", "8", *common]
    six = "[semseg, depth, normals, sal, edge, human_parts]"

    def judge_etr(runs: Mapping[str, Run]) -> list[str]:
        lines = []
        for name, run in _measured(runs, lines):
            ratios = run.report["devices"][0]["ratios"]
            t = len(run.report["tasks"])
            size = "x".join(map(str, run.report["image_size"]))
            for phase in ("infer", "train"):
                value = ratios.get(f"per_task_over_batched/fp32/eager/{phase}")
                if value is None:
                    continue
                verdict = ""
                if phase == "infer":
                    verdict = _verdict(value, 2.0, at_most=False)
                lines.append(
                    f"- `{name}` (T={t}, {size}, batch {run.report['batch_size']}, {run.report['threads']} thread(s)) "
                    f"per-task / batched {phase}: **{value:.2f}**{verdict}"
                )
                if "missed" in verdict:
                    lines += _profile_lines(run.report, ["model/fp32/eager/infer", "per_task/fp32/eager/infer"])
        return lines

    def judge_loader(runs: Mapping[str, Run]) -> list[str]:
        lines = []
        for name, run in _measured(runs, lines):
            loader = run.report["loader"]
            if loader is None:
                lines.append(f"- `{name}`: loader skipped: {run.report['skipped'].get('loader')}")
                continue
            ratio = run.report["devices"][0]["ratios"].get("loader_over_train_samples_per_s", 0.0)
            train = _result(run.report, "model/fp32/eager/train")
            size = "x".join(map(str, run.report["image_size"]))
            lines.append(
                f"- `{name}` ({size}, batch {loader['batch_size']}, {loader['num_workers']} workers): loader "
                f"{loader['samples_per_s']:.0f} samples/s, training step {train['samples_per_s']:.1f} samples/s: "
                f"**{ratio:.1f}x**{_verdict(ratio, 2.0, at_most=False)}"
            )
        return lines

    hard_sharing = ["--config", "configs/hard_sharing_synthscenes.yaml"]
    synth = [*hard_sharing, "--batch-size", "16", "--steps", "3", "--warmup", "1", "--loader-batches", "30", "--no-bare", *common]
    nyud = [
        *hard_sharing, "--config", "configs/data/nyud.yaml", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--loader-batches", "10",
        "--no-bare", *common, "--", "--data.init_args.root", str(nyud_root),
    ]
    loader_runs = [
        ("synthscenes_hard_sharing", synth),
        ("synthscenes_hard_sharing_2_workers", [*synth, "--", "--data.init_args.num_workers", "2"]),
        ("nyud_fixture_hard_sharing_0_workers", [*nyud, "--data.init_args.num_workers", "0"]),
        ("nyud_fixture_hard_sharing_2_workers", [*nyud, "--data.init_args.num_workers", "2"]),
    ]
    return [
        Target(
            "TaskExpert training step vs its bare ViT-S/16 (224x224, batch 2, the PASCAL ViT-B config's TaskExpert "
            "with D = head width = 128, a third of ViT-S's 384 channels as 256 is of ViT-B's 768)", [
            ("taskexpert_vits_224", vit_s),
            ("taskexpert_vits_224_head_scale_1", [*vit_s, "--model.init_args.net.init_args.head_scale", "1"]),
            ("taskexpert_vits_224_compiled", [*vit_s[: vit_s.index("--")], "--compile", "--modes", "fp32", *vit_s[vit_s.index("--"):]]),
        ], judge_vit),
        Target("ETR-NLP batched all-task forward vs per-task", [
            ("etr_nlp_synthscenes_T4", etr),
            ("etr_nlp_synthscenes_T6", [*etr, "--", "--data.init_args.tasks", six]),
            ("etr_nlp_synthscenes_T6_128", [*etr, "--image-size", "128", "128", "--", "--data.init_args.tasks", six]),
            ("etr_nlp_synthscenes_T4_2_threads", [*etr, "--threads", "2"]),
            ("etr_nlp_synthscenes_T6_128_2_threads", [
                *etr, "--threads", "2", "--image-size", "128", "128", "--", "--data.init_args.tasks", six,
            ]),
            ("etr_nlp_nyuv2_binary_T15", [
                "--config", "configs/etr_nlp_nyuv2.yaml", "--config", "configs/etr_nlp_nyuv2_binary.yaml",
                "--image-size", "96", "128", "--batch-size", "2", "--modes", "fp32", "--steps", "3", "--warmup", "1",
                "--profile", "8", *common,
            ]),
        ], judge_etr),
        Target("Data loading vs training step (samples/s)", loader_runs, judge_loader),
    ]


def target_section(results: Sequence[tuple[Target, dict[str, Run]]]) -> str:
    """The markdown of the targets section."""
    lines = [TARGET_SECTION, "", f"Written by `python benchmarks/run_all.py` on {time.strftime('%Y-%m-%d')}.", ""]
    for target, runs in results:
        lines += [f"### {target.title}", "", *target.judge(runs), "", "Commands:", ""]
        lines += [f"- `{run.command}`" for run in runs.values()]
        lines.append("")
    all_runs = [run for _, runs in results for run in runs.values()]
    lines += [machine_line(all_runs), ""]
    return "\n".join(lines)


def replace_section(text: str, header: str, body: str) -> str:
    """``text`` with the ``## `` section titled ``header`` replaced by ``body`` (appended when absent)."""
    lines = text.splitlines()
    if header not in lines:
        return text.rstrip() + "\n\n" + body.rstrip() + "\n"
    start = lines.index(header)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join([*lines[:start], *body.rstrip().splitlines(), "", *lines[end:]]).rstrip() + "\n"


def write_section(path: Path, header: str, body: str) -> None:
    """Replace (or append) one section of ``path``, re-reading it first: other sections, written by
    other scripts or by a concurrent run of this one, are kept."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    path.write_text(replace_section(text, header, body))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="bench only configs whose path contains this")
    parser.add_argument("--skip-configs", action="store_true", help="run the target checks only")
    parser.add_argument("--skip-targets", action="store_true", help="run the per-config table only")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-pixels", type=int, default=24576, help="reduce larger config resolutions to this")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is steadier on a shared machine)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per bench run")
    parser.add_argument("--json-dir", type=Path, help="keep the JSON reports here (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        json_dir = options.json_dir or Path(tmp) / "json"
        json_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "POLYTASK_CACHE": os.environ.get("POLYTASK_CACHE", str(Path(tmp) / "cache"))}
        if not options.skip_configs:
            runs = []
            writers = _fixture_writers()
            for config in benchmark_configs(REPO / "configs"):
                name = str(config.relative_to(REPO / "configs"))
                if options.only and not any(p in name for p in options.only):
                    continue
                chain = config_chain(config)
                data_class = _data_class(chain)
                overrides = []
                if data_class in writers:
                    root = Path(tmp) / "fixtures" / data_class
                    if not root.exists():
                        writers[data_class](root)
                    overrides = ["--", "--data.init_args.root", str(root)]
                args = [
                    *(a for c in chain for a in ("--config", str(c.relative_to(REPO)))),
                    "--batch-size", str(options.batch_size), "--max-pixels", str(options.max_pixels),
                    "--fallback-image-size", "128", "160",
                    "--modes", "fp32,bf16", "--steps", str(options.steps), "--warmup", str(options.warmup),
                    "--threads", str(options.threads), "--device", "cpu", *overrides,
                ]
                runs.append(run_bench(name, args, json_dir, options.timeout, env))
            write_section(options.results, CONFIG_SECTION, config_section(runs, options))
        if not options.skip_targets:
            fixture = _nyud_fixture(Path(tmp) / "NYUD_MT")
            results = []
            for target in targets(fixture, options.threads):
                runs = {name: run_bench(name, args, json_dir, options.timeout, env) for name, args in target.runs}
                results.append((target, runs))
            write_section(options.results, TARGET_SECTION, target_section(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
