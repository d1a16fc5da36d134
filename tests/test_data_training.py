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
        write_pascal_context, "PascalContextDataModule",
        ["--data.train_size", "[32, 32]", "--data.eval_size", "[40, 48]"],
        {"semseg", "human_parts", "sal", "normals", "edge"},
    ),
    "nyud_atrc": (
        lambda root: write_nyud(root, "atrc"), "NYUDDataModule",
        ["--data.train_size", "[32, 32]", "--data.eval_size", "[36, 44]"], {"semseg", "depth", "normals", "edge"},
    ),
    "nyud_mti_net": (
        lambda root: write_nyud(root, "mti-net"), "NYUDDataModule",
        ["--data.train_size", "[32, 32]", "--data.eval_size", "[36, 44]", "--data.tasks", "[semseg, normals]"],
        {"semseg", "normals"},
    ),
    "nyuv2_mtan_binary": (
        write_mtan_nyuv2, "NYUv2MTANDataModule", ["--data.task_split", "binary"],
        {"seg_bed", "seg_window", "depth", "normals"},
    ),
    "cityscapes_mtan": (write_mtan_cityscapes, "CityscapesMTANDataModule", ["--data.num_classes", "19"], {"semseg", "depth"}),
    "celeba": (write_celeba, "CelebADataModule", [], {"global", "accessories"}),
    "folder": (
        write_folder, "FolderDataModule", ["--data.train_size", "[16, 16]", "--data.eval_size", "[28, 36]"],
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


def accepted_arguments(cls: type) -> set[str]:
    """The keyword arguments ``cls`` accepts, following ``**kwargs`` forwarded up its base classes."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters
        names |= {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            break
    return names


def test_accepted_arguments_follow_forwarded_kwargs() -> None:
    class Base:
        def __init__(self, root: str, batch_size: int = 1) -> None: ...

    class Child(Base):
        def __init__(self, size: int = 2, **kwargs: object) -> None: ...

    class Closed(Base):
        def __init__(self, size: int = 2) -> None: ...

    assert accepted_arguments(Child) == {"size", "root", "batch_size"}
    assert accepted_arguments(Closed) == {"size"}


@pytest.mark.parametrize("config", sorted(DATA_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_data_configs_name_a_datamodule_and_its_arguments(config: Path) -> None:
    data = yaml.safe_load(config.read_text())
    assert set(data) == {"data"}
    module_path, class_name = data["data"]["class_path"].rsplit(".", 1)
    assert module_path == "polytask.data"
    modules = {cls.__name__: cls for cls in registry().values()}
    assert class_name in modules
    assert set(data["data"]["init_args"]) <= accepted_arguments(modules[class_name]) and "root" in data["data"]["init_args"]
    assert config.stem == modules[class_name].name
