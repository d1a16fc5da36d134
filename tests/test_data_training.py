"""A few training steps on every dataset fixture through the ``polytask`` CLI, and the data configs."""

import inspect
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, HARD_SHARING_CONFIG, TINY_HARD_SHARING_CLI
from fixtures_data import (
    write_celeba,
    write_folder,
    write_mtan_cityscapes,
    write_mtan_nyuv2,
    write_nyud,
    write_pascal_context,
)
from polytask.cli import main
from polytask.data.registry import registry

DATA_CONFIGS = CONFIGS / "data"
SMALL_MODEL = [
    "--config", HARD_SHARING_CONFIG, *TINY_HARD_SHARING_CLI,
    "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
    "--data.batch_size", "2",
]
RUNS: dict[str, tuple[Callable[[Path], object], str, list[str], set[str]]] = {
    "pascal_context": (
        write_pascal_context, "pascal_context.PascalContextDataModule",
        ["--data.train_size", "[32, 32]", "--data.eval_size", "[40, 48]"],
        {"semseg", "human_parts", "sal", "normals", "edge"},
    ),
    "nyud_atrc": (
        lambda root: write_nyud(root, "atrc"), "nyud.NYUDDataModule",
        ["--data.train_size", "[32, 32]", "--data.eval_size", "[36, 44]"], {"semseg", "depth", "normals", "edge"},
    ),
    "nyud_mti_net": (
        lambda root: write_nyud(root, "mti-net"), "nyud.NYUDDataModule",
        ["--data.train_size", "[32, 32]", "--data.eval_size", "[36, 44]", "--data.tasks", "[semseg, normals]"],
        {"semseg", "normals"},
    ),
    "nyuv2_mtan_binary": (
        write_mtan_nyuv2, "mtan.NYUv2MTANDataModule", ["--data.task_split", "binary"],
        {"seg_bed", "seg_window", "depth", "normals"},
    ),
    "cityscapes_mtan": (write_mtan_cityscapes, "mtan.CityscapesMTANDataModule", ["--data.num_classes", "19"], {"semseg", "depth"}),
    "celeba": (write_celeba, "celeba.CelebADataModule", [], {"global", "accessories"}),
    "folder": (
        write_folder, "folder.FolderDataModule", ["--data.train_size", "[16, 16]", "--data.eval_size", "[28, 36]"],
        {"semseg", "surface", "depth", "normals", "edge"},
    ),
}


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster, and immune to a busy machine
def test_fit_runs_end_to_end(workdir: Path, run: str) -> None:
    write, class_path, options, expected_tasks = RUNS[run]
    write(workdir / "dataset")
    main(["fit", "--data", f"polytask.data.{class_path}", "--data.root", str(workdir / "dataset"), *options, *SMALL_MODEL])
    reports = list(workdir.glob("runs/**/val_metrics.json"))
    assert len(reports) == 1
    assert expected_tasks <= set(json.loads(reports[0].read_text())["results"])


@pytest.mark.parametrize("config", sorted(DATA_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_data_configs_name_a_datamodule_and_its_arguments(config: Path) -> None:
    data = yaml.safe_load(config.read_text())
    assert set(data) == {"data"}
    module_path, class_name = data["data"]["class_path"].rsplit(".", 1)
    assert module_path == "polytask.data"
    modules = {cls.__name__: cls for cls in registry().values()}
    assert class_name in modules
    parameters = inspect.signature(modules[class_name].__init__).parameters
    assert set(data["data"]["init_args"]) <= set(parameters) and "root" in data["data"]["init_args"]
    assert config.stem == modules[class_name].name
