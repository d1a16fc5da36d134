"""Resumable training: a run killed mid-epoch with SIGKILL and resumed with ``--ckpt_path last``
ends with the same weights and metrics as an uninterrupted run; the training order behind it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import instantiate_class
from torch.utils.data import Dataset

from conftest import CONFIGS, HARD_SHARING_CONFIG, POLYTASK, subprocess_env
from polytask.config import PolytaskCLI, config_cli
from polytask.data.datamodule import ResumableLoader, ResumableSampler, SeededSamples
from polytask.data.datasets.synthscenes import SynthScenes
from polytask.training.checkpoint import ResumableCheckpoint, check_plain, last_checkpoints, read_checkpoint
from polytask.training.run_folder import assign_run_folder

STEPS_PER_EPOCH = 8
KILL_AT_STEP = 10
TIMEOUT_S = 600


def fit_args(cache: Path, *extra: str) -> list[str]:
    """``polytask fit`` of a tiny stochastic model (drop path, flips) checkpointing every step, its
    losses weighted by FAMO (a strategy whose state changes at every step)."""
    return [
        "fit",
        "--config", HARD_SHARING_CONFIG,
        "--trainer.max_epochs", "2",
        "--trainer.callbacks.every_n_train_steps", "1",
        "--trainer.log_every_n_steps", "1",
        "--data.num_train", str(8 * STEPS_PER_EPOCH),
        "--data.num_val", "8",
        "--data.image_size", "[32, 48]",
        "--data.batch_size", "8",
        "--data.cache_dir", str(cache),
        "--model.net.backbone", "test_resnet",
        "--model.net.decoder_channels", "16",
        "--model.net.head_channels", "8",
        "--model.net.backbone_options", "{drop_path_rate: 0.2}",
        "--model.weighting", "polytask.weighting.FAMO",
        *extra,
    ]  # fmt: skip


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    """``polytask ARGS`` in a subprocess (one thread, so every run computes alike)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [*POLYTASK, *args],
        cwd=cwd,
        env=subprocess_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
        stdout=(cwd / "stdout.txt").open("w"),
        stderr=subprocess.STDOUT,
    )


def finish(process: subprocess.Popen, cwd: Path) -> None:
    assert process.wait(timeout=TIMEOUT_S) == 0, (cwd / "stdout.txt").read_text()[-5000:]


def global_step(path: Path) -> int:
    return int(read_checkpoint(path)["global_step"]) if path.exists() else -1


def kill_after(process: subprocess.Popen, ckpt: Path, step: int) -> None:
    """SIGKILL ``process`` as soon as its checkpoint ``ckpt`` has reached ``step``."""
    deadline = time.monotonic() + TIMEOUT_S
    seen = None
    while time.monotonic() < deadline and process.poll() is None:
        stamp = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        if stamp != seen:
            seen = stamp
            if global_step(ckpt) >= step:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or timed out before step {step}")


def run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "runs" / "hard_sharing_synthscenes").glob("version_*"))


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for split, n in (("train", 8 * STEPS_PER_EPOCH), ("val", 8), ("test", 8)):
        SynthScenes(split, n, (32, 48), cache_dir=cache).prepare()
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    reference = start(fit_args(cache), straight)
    victim = start(fit_args(cache), killed)
    victim_ckpt = killed / "runs" / "hard_sharing_synthscenes" / "version_0" / "checkpoints" / "last.ckpt"
    kill_after(victim, victim_ckpt, KILL_AT_STEP)
    resumed_from = global_step(victim_ckpt)
    assert resumed_from % STEPS_PER_EPOCH != 0, f"the kill landed on an epoch boundary (step {resumed_from})"

    resumed = start(fit_args(cache, "--ckpt_path", "last"), killed)
    finish(resumed, killed)
    finish(reference, straight)
    log = (killed / "stdout.txt").read_text()
    assert f"Restoring states from the checkpoint path at {victim_ckpt.relative_to(killed)}" in log

    (reference_dir,) = run_dirs(straight)
    first_dir, resumed_dir = run_dirs(killed)
    expected = read_checkpoint(reference_dir / "checkpoints" / "last.ckpt")
    got = read_checkpoint(resumed_dir / "checkpoints" / "last.ckpt")
    assert got["global_step"] == expected["global_step"] == 2 * STEPS_PER_EPOCH
    check_plain(got)
    assert int(expected["state_dict"]["weighting.adam_steps"]) == 2 * STEPS_PER_EPOCH - 1  # FAMO's state is compared too
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=1e-6, msg=f"weights differ at {key}")
    assert got["lr_schedulers"][0]["last_epoch"] == expected["lr_schedulers"][0]["last_epoch"]
    lrs = [c["optimizer_states"][0]["param_groups"][0]["lr"] for c in (got, expected)]
    assert lrs[0] == pytest.approx(lrs[1])

    metrics = [json.loads((d / "val_metrics.json").read_text())["results"] for d in (reference_dir, resumed_dir)]
    for task, values in metrics[0].items():
        for name, value in values.items():
            assert metrics[1][task][name] == pytest.approx(value, abs=1e-6), f"{task}/{name}"
    assert first_dir.name < resumed_dir.name


def documented_fit_commands() -> dict[str, tuple[str, ...]]:
    """The configs of every ``polytask fit --config ...`` command in the comments of ``configs/*.yaml``
    (overlays are documented layered on their base), plus the defaults alone."""
    commands: dict[str, tuple[str, ...]] = {"defaults": ()}
    for path in sorted(CONFIGS.glob("*.yaml")):
        for line in path.read_text().splitlines():
            match = re.match(r"#\s+polytask fit\s+((?:--config \S+\s*)+)", line)
            if match:
                files = tuple(re.findall(r"--config (\S+)", match.group(1)))
                commands[" + ".join(Path(f).stem for f in files)] = files
    return commands


COMMANDS = documented_fit_commands()


class _ParseOnly(PolytaskCLI):
    """Parses a config (over the defaults) and builds nothing: the networks of paper configs are large."""

    def instantiate_classes(self) -> None:
        return None


def _trainer_of(config: Any) -> pl.Trainer:
    """A trainer with the loggers and callbacks of a parsed ``trainer`` config (what finds and writes ``last.ckpt``)."""
    loggers = config.logger if isinstance(config.logger, list) else [config.logger]
    return pl.Trainer(
        logger=[instantiate_class((), logger.as_dict()) for logger in loggers],
        callbacks=[instantiate_class((), callback.as_dict()) for callback in config.callbacks],
        default_root_dir=config.default_root_dir,
    )


def test_every_config_is_covered_by_a_documented_fit_command() -> None:
    covered = {Path(f).name for files in COMMANDS.values() for f in files}
    assert covered >= {p.name for p in CONFIGS.glob("*.yaml")}


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_writes_last_periodically_and_resumes_from_it(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first run of the config writes ``last.ckpt`` every N steps; a second run of the same
    config (a new logger version) finds it with ``--ckpt_path last``."""
    monkeypatch.chdir(tmp_path)
    parsed = config_cli(_ParseOnly, [str(CONFIGS.parent / f) for f in COMMANDS[command]]).config

    def run_trainer() -> pl.Trainer:
        """The trainer of one ``polytask fit`` of the config: its loggers named and versioned as the CLI does."""
        config = parsed.clone()
        assign_run_folder(config, "fit", None)
        return _trainer_of(config.trainer)

    first = run_trainer()
    writers = [c for c in first.checkpoint_callbacks if isinstance(c, ResumableCheckpoint) and c.save_last]
    assert len(writers) == 1, f"{command}: needs one ResumableCheckpoint with save_last: true"
    (writer,) = writers
    assert writer._every_n_train_steps > 0 or writer._train_time_interval is not None, (
        f"{command}: the ResumableCheckpoint writes last.ckpt only at the end (set every_n_train_steps)"
    )
    assert all(not isinstance(c, ModelCheckpoint) or c is writer or not c.save_last for c in first.checkpoint_callbacks)
    assert last_checkpoints(first) == []

    writer.setup(first, None, "fit")  # resolves the folder of the first run, as fit does
    last = Path(writer.format_checkpoint_name({}, writer.CHECKPOINT_NAME_LAST))
    last.parent.mkdir(parents=True)
    last.touch()
    second = run_trainer()
    assert Path(second.log_dir).name == "version_1"
    assert [Path(p).resolve() for p in last_checkpoints(second)] == [last.resolve()]


class _Noise(Dataset):
    """Sample ``i`` is ``(i, a random draw)``: shows which global-generator state built it."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, float(torch.rand(()))


def _items(sampler: ResumableSampler) -> list[tuple[int, int]]:
    return list(iter(sampler))


def test_order_depends_only_on_seed_and_epoch() -> None:
    a, b = ResumableSampler(_Noise(), seed=3), ResumableSampler(_Noise(), seed=3)
    torch.rand(5)
    assert _items(a) == _items(b)
    b.set_epoch(1)
    assert [i for i, _ in _items(b)] != [i for i, _ in _items(a)]
    assert sorted(i for i, _ in _items(b)) == list(range(10))


def test_ranks_share_the_epoch_order() -> None:
    whole = _items(ResumableSampler(_Noise(), seed=0))
    ranks = [_items(ResumableSampler(_Noise(), seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [item for pair in zip(*ranks) for item in pair] == whole


def test_resume_skips_exactly_the_consumed_samples() -> None:
    sampler = ResumableSampler(_Noise(), seed=0)
    sampler.set_epoch(2)
    whole = _items(sampler)
    sampler.resume(2, 4)
    assert _items(sampler) == whole[4:]
    assert _items(sampler) == whole, "a resume applies to one iteration only"


def test_seeded_samples_draw_the_same_augmentation_whatever_the_global_state() -> None:
    samples = SeededSamples(_Noise())
    torch.manual_seed(1)
    first = samples[(4, 123)]
    torch.manual_seed(2)
    state = torch.get_rng_state()
    assert samples[(4, 123)] == first
    assert torch.equal(torch.get_rng_state(), state), "the global generator is left as it was"
    assert samples[4][0] == 4


def _loader(consumed: int) -> ResumableLoader:
    dataset = _Noise()
    return ResumableLoader(SeededSamples(dataset), ResumableSampler(dataset, seed=7), lambda: consumed, batch_size=2)


def test_loader_state_resumes_after_the_consumed_batches() -> None:
    full = _loader(0)
    full.sampler.set_epoch(1)
    batches = [b[1].tolist() for b in full]
    saved = _loader(2)
    saved.sampler.set_epoch(1)
    state = saved.state_dict()
    assert state == {"seed": 7, "epoch": 1, "batches": 2, "batch_size": 2, "num_replicas": 1}

    restored = _loader(0)
    restored.load_state_dict(state)
    assert [b[1].tolist() for b in restored] == batches[2:]


def test_loader_state_at_the_end_of_an_epoch_starts_the_next() -> None:
    restored = _loader(0)
    restored.load_state_dict({"seed": 7, "epoch": 1, "batches": 5, "batch_size": 2, "num_replicas": 1})
    next_epoch = _loader(0)
    next_epoch.sampler.set_epoch(2)
    assert [b[1].tolist() for b in restored] == [b[1].tolist() for b in next_epoch]
