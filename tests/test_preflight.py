"""A command checks its data and its pretrained weights before building anything, and reports every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from polytask.cli import main
from polytask.models import backbones

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = str(ROOT / "configs" / "taskexpert_pascal_vitb.yaml")
WEIGHTS_FLAG = "--model.init_args.net.init_args.pretrained"


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network and empty weight caches."""
    monkeypatch.setattr(backbones, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(backbones.huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(backbones.torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(args)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("  - ")]


def test_missing_weights_and_data_are_reported_together_with_their_fixes(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, problems = run(["fit", "--config", PAPER_CONFIG, "--data.init_args.root", str(offline / "nowhere")], capsys)
    assert code == 2
    assert len(problems) == 3  # the weights, the train split, the val split
    weights, train, val = problems
    assert "'vit_base_patch16_384.augreg_in21k_ft_in1k'" in weights and "cannot be reached" in weights
    assert f"{WEIGHTS_FLAG} false" in weights and "--model.init_args.net.init_args.pretrained_file" in weights
    for problem, split in ((train, "train"), (val, "val")):
        assert f"pascal_context split {split!r}: {offline / 'nowhere'}" in problem
        assert "--data.init_args.root" in problem


def test_each_fix_removes_its_problem(offline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, problems = run(["fit", "--config", PAPER_CONFIG, WEIGHTS_FLAG, "false"], capsys)
    assert code == 2 and len(problems) == 2 and all("--data.init_args.root" in p for p in problems)
    weights = offline / "vit.safetensors"
    weights.write_bytes(b"")
    code, problems = run(["validate", "--config", PAPER_CONFIG, "--model.init_args.net.init_args.pretrained_file", str(weights)], capsys)
    assert code == 2 and len(problems) == 1 and "pascal_context split 'val'" in problems[0]


def test_cached_weights_need_no_network(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert backbones.pretrained_weights_problem("resnet18") is not None
    monkeypatch.setattr(backbones.huggingface_hub, "try_to_load_from_cache", lambda repo, filename, **kw: f"/cache/{repo}/{filename}")
    assert backbones.pretrained_weights_problem("resnet18") is None
    assert backbones.pretrained_weights_problem("not_a_timm_model") is None  # building the model names that error


def test_hub_offline_variable_counts_as_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones.huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, as parsed at import
    assert backbones._hub_reachable() is False
