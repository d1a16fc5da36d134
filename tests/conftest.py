"""What the test files share: repository paths, the ``polytask`` command without the console script,
tiny networks and datamodules, and the fixtures every run needs.

Fixtures (no import needed):

* ``polytask_cache`` (session, autouse): ``$POLYTASK_CACHE`` points at one temporary folder for the
  whole run, so no test writes to ``~/.cache/polytask`` and SynthScenes splits rendered by one test
  (keyed by seed, split, size and tasks) are reused by the next. Tests that need an empty cache
  (``fresh_cache``) or their own get it per test.
* ``fresh_cache``: ``$POLYTASK_CACHE`` in the test's own ``tmp_path/cache``.
* ``workdir``: the test runs in its own ``tmp_path`` (relative dataset roots of the configs do not
  exist there; ``runs/`` lands there).
* ``one_thread``: torch on one thread for the test (tiny tensors: faster, and steadier on a busy machine).

Helpers (``from conftest import ...``): :data:`REPO`, :data:`CONFIGS`, :data:`POLYTASK`,
:func:`subprocess_env`, the ``TINY_*`` network options, :func:`tiny_net_options`,
:func:`tiny_hard_sharing` and :func:`tiny_synthscenes`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
CONFIGS = REPO / "configs"
HARD_SHARING_CONFIG = str(CONFIGS / "hard_sharing_synthscenes.yaml")

POLYTASK = [sys.executable, "-m", "polytask"]
"""The ``polytask`` command of this interpreter, without the installed console script (``src/polytask/__main__.py``)."""


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a ``polytask`` subprocess: this one's (``$POLYTASK_CACHE`` included),
    output unbuffered, the tests folder importable (callbacks defined in test modules), plus ``extra``."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


# --- tiny networks -----------------------------------------------------------------------------

TINY_VIT = {"img_size": [32, 32], "patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 2}
"""``backbone_options`` of a 4-block ViT of width 48 (any timm ViT name)."""
TINY_TASKEXPERT = {
    "backbone": "vit_tiny_patch16_224", "pretrained": False, "backbone_options": TINY_VIT,
    "mmoe_blocks": [2, 4], "num_experts": 3, "width": 16, "head_channels": 8,
}  # fmt: skip
TINY_HARD_SHARING = {"backbone": "test_resnet", "decoder_channels": 16, "head_channels": 8}
TINY_HARD_SHARING_VIT = {"backbone_options": TINY_VIT, "out_indices": [0, 1, 2, 3], "decoder_channels": 16, "head_channels": 8}
TINY_SEGNET = {"filters": [8, 8, 16, 16, 16]}
"""ETR-NLP's SegNet (``RoutedSegNet``, any routing)."""
TINY_RESNET = {"backbone_options": {"channels": [8, 8, 16, 16], "stem_width": 8, "output_stride": 8}, "head_channels": 8}
"""ETR-NLP's ResNet-18 (``RoutedResNet``, any routing)."""
TINY_HARD_SHARING_CLI = [
    "--model.net.init_args.backbone", "test_resnet",
    "--model.net.init_args.decoder_channels", "16", "--model.net.init_args.head_channels", "8",
]  # fmt: skip
"""Command-line overrides of :data:`TINY_HARD_SHARING` (over a config whose network is ``HardSharing``)."""


def tiny_net_options(class_path: str, init_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``init_args`` overrides that shrink a network of ``configs/`` (class ``class_path``, its
    configured ``init_args``) to a tiny one of the same class.

    Raises:
        KeyError: a network class without tiny options here (add it when a config brings one).
    """
    name = class_path.rpartition(".")[2]
    backbone = str((init_args or {}).get("backbone") or "")
    if name in ("TaskExpert", "StaticTaskExpert"):
        return dict(TINY_TASKEXPERT)
    if name == "HardSharing":
        return dict(TINY_HARD_SHARING_VIT if "vit" in backbone else TINY_HARD_SHARING)
    if name.endswith("SegNet"):
        return dict(TINY_SEGNET)
    if name.endswith(("ResNet", "ResNet18")):
        return dict(TINY_RESNET)
    raise KeyError(f"no tiny options for the network {class_path}")


def tiny_hard_sharing(decoder_channels: int = 8, head_channels: int = 4) -> functools.partial:
    """A ``net`` factory for :class:`~polytask.training.MultiTaskModule`: hard sharing on timm's ``test_resnet``."""
    from polytask.models import HardSharing

    return functools.partial(HardSharing, backbone="test_resnet", decoder_channels=decoder_channels, head_channels=head_channels)


def tiny_synthscenes(
    tasks: Sequence[str],
    cache_dir: str | Path,
    num_train: int = 8,
    num_val: int = 4,
    image_size: Sequence[int] = (32, 48),
    batch_size: int = 4,
    **options: Any,
) -> Any:
    """A SynthScenes datamodule of a few small images (by default 8 training images in batches of 4: two steps per epoch)."""
    from polytask.data import SynthScenesDataModule

    return SynthScenesDataModule(
        list(tasks), num_train=num_train, num_val=num_val, image_size=tuple(image_size), cache_dir=str(cache_dir),
        batch_size=batch_size, **options,
    )  # fmt: skip


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def polytask_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$POLYTASK_CACHE`` for the whole run: one temporary folder (never ``~/.cache/polytask``)."""
    cache = tmp_path_factory.mktemp("polytask_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYTASK_CACHE", str(cache))
        yield cache


@pytest.fixture()
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$POLYTASK_CACHE`` of this test alone (empty): for tests that look at what is cached or rendered."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("POLYTASK_CACHE", str(cache))
    return cache


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test runs in its own empty folder (``runs/`` and relative paths land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """torch on one thread during the test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _loggers_stay_enabled() -> Iterator[None]:
    """Loggers a test disabled are enabled again after it: ``logging.config`` (which import-linter
    calls in tests/test_architecture.py) disables every existing logger, and the ``caplog`` tests
    that run later would then see nothing."""
    def loggers() -> list[logging.Logger]:
        return [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]

    disabled = {id(lg) for lg in loggers() if lg.disabled}
    yield
    for logger in loggers():
        if logger.disabled and id(logger) not in disabled:
            logger.disabled = False
