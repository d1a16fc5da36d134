"""Safe checkpoints: atomic writes survive SIGKILL, weights-only loading refuses pickled code,
safetensors export and loading, clear errors for checkpoints of another model."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import tiny_hard_sharing, tiny_synthscenes
from polytask.cli.export import main as export_main
from polytask.data.datasets.synthscenes import SynthScenesDataModule
from polytask.tasks import build_task
from polytask.training.checkpoint import (
    CHECKPOINT_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    check_plain,
    load_weights,
    read_checkpoint,
)
from polytask.training.module import MultiTaskModule

TASKS = ("depth", "sal")


def tiny_module(tasks: Sequence[str] = TASKS, decoder_channels: int = 8) -> MultiTaskModule:
    net = tiny_hard_sharing(decoder_channels)
    return MultiTaskModule(net=net, tasks=[build_task(t) for t in tasks])


def tiny_data(cache: Path, tasks: Sequence[str] = TASKS) -> SynthScenesDataModule:
    return tiny_synthscenes(tasks, cache)


def trainer(root: Path, **options: object) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
        **options,
    )


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning checkpoint of :func:`tiny_module` after two training steps."""
    root = tmp_path_factory.mktemp("trained")
    pl.seed_everything(0)
    t = trainer(root, max_steps=2, limit_val_batches=0)
    t.fit(tiny_module(), datamodule=tiny_data(root / "cache"))
    path = root / "tiny.ckpt"
    t.save_checkpoint(path)
    return path


WRITER = textwrap.dedent(
    """
    import io, sys, time
    from pathlib import Path
    import torch
    from polytask.training.checkpoint import AtomicCheckpointIO

    target, marker = Path(sys.argv[1]), Path(sys.argv[2])
    plugin = AtomicCheckpointIO()
    plugin.save_checkpoint({"version": 1, "weights": torch.ones(1000)}, target)
    real_save = torch.save

    def stalled_save(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        marker.touch()
        time.sleep(600)

    torch.save = stalled_save
    plugin.save_checkpoint({"version": 2, "weights": torch.zeros(1000)}, target)
    """
)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target, marker = tmp_path / "ckpts" / "last.ckpt", tmp_path / "half_written"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(marker)])
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "the writer ended before writing half a checkpoint"
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    (partial,) = target.parent.glob(".last.ckpt.*.tmp")
    assert 0 < partial.stat().st_size
    checkpoint = read_checkpoint(target)
    assert checkpoint["version"] == 1 and torch.equal(checkpoint["weights"], torch.ones(1000))

    AtomicCheckpointIO().save_checkpoint({"version": 3}, target)
    assert read_checkpoint(target)["version"] == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"], "the stale temporary file is removed"


class _Payload:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path, trained_checkpoint: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"] = {"payload": _Payload(marker)}
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)

    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil\.ckpt.*posix\.system"):
        read_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError):
        load_weights(tiny_module(), evil)
    assert export_main(["--ckpt", str(evil), "--out", str(tmp_path / "w.safetensors")]) == 1
    with pytest.raises(UnsafeCheckpointError), pytest.warns(UserWarning, match="weights_only=False ignored"):
        trainer(tmp_path).validate(tiny_module(), datamodule=tiny_data(tmp_path / "cache"), ckpt_path=evil, weights_only=False)
    assert not marker.exists()
    assert not (tmp_path / "w.safetensors").exists()


def test_checkpoints_hold_only_plain_values(trained_checkpoint: Path) -> None:
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    check_plain(checkpoint)
    entry = checkpoint[CHECKPOINT_KEY]
    assert '"class": "polytask.models.baselines.HardSharing"' in entry["config"]
    assert set(entry) == {"config", "rng", "guard"}


def test_saving_a_non_plain_value_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(UnsafeCheckpointError, match=r"\['callbacks'\]\['Custom'\]\['folder'\] is a pathlib\.\w*Path"):
        AtomicCheckpointIO().save_checkpoint({"callbacks": {"Custom": {"folder": Path("x")}}}, tmp_path / "c.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="numpy.float64"):
        check_plain({"score": __import__("numpy").float64(1.0)})
    assert not list(tmp_path.iterdir())


def test_export_to_safetensors_and_load_back(tmp_path: Path, trained_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tiny.safetensors"
    assert export_main(["--ckpt", str(trained_checkpoint), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    expected = {k[len("net.") :]: v for k, v in torch.load(trained_checkpoint, weights_only=True)["state_dict"].items()}

    for source in (out, trained_checkpoint):
        net = load_weights(tiny_module(), source)
        assert net.state_dict().keys() == expected.keys()
        for key, value in net.state_dict().items():
            assert torch.equal(value, expected[key]), (source, key)
    assert load_weights(tiny_module().net, out).state_dict().keys() == expected.keys()


def test_weights_of_another_model_fail_with_keys_shapes_and_configs(tmp_path: Path, trained_checkpoint: Path) -> None:
    out = tmp_path / "tiny.safetensors"
    assert export_main(["--ckpt", str(trained_checkpoint), "--out", str(out)]) == 0
    with pytest.raises(CheckpointMismatchError) as caught:
        load_weights(tiny_module(tasks=["depth"], decoder_channels=16), out)
    message = str(caught.value)
    assert "tiny.safetensors does not fit this model" in message
    assert "unexpected in the checkpoint: heads.sal." in message
    assert "shape of decoder." in message and "checkpoint (8," in message and "model (16," in message
    assert '"decoder_channels": 8' in message and '"decoder_channels": 16' in message
    assert '"name": "sal"' in message


def test_resuming_another_model_fails_with_a_clear_message(tmp_path: Path, trained_checkpoint: Path) -> None:
    other = tiny_module(tasks=["depth"])
    expected = r"tiny\.ckpt does not fit this model(.|\n)*unexpected in the checkpoint: net\.heads\.sal"
    with pytest.raises(CheckpointMismatchError, match=expected):
        trainer(tmp_path, max_steps=3).fit(other, datamodule=tiny_data(tmp_path / "cache", ["depth"]), ckpt_path=trained_checkpoint)


def test_a_truncated_checkpoint_is_reported_as_such(tmp_path: Path, trained_checkpoint: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(trained_checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"broken\.ckpt is not a readable checkpoint \(truncated or corrupt\?\)"):
        read_checkpoint(broken)
    buffer = io.BytesIO()
    torch.save([1, 2], buffer)
    (tmp_path / "list.ckpt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="holds a list, expected a checkpoint dict"):
        read_checkpoint(tmp_path / "list.ckpt")
