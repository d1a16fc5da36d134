"""The datasets polytask knows by name, and datamodule classes by their config class path."""

from __future__ import annotations

import importlib
from typing import Any

from polytask.data.datamodule import MultiTaskDataModule
from polytask.data.datasets.celeba import CelebADataModule
from polytask.data.datasets.folder import FolderDataModule
from polytask.data.datasets.mtan import CityscapesMTANDataModule, NYUv2MTANDataModule
from polytask.data.datasets.nyud import NYUDDataModule
from polytask.data.datasets.pascal_context import PascalContextDataModule
from polytask.data.file_datamodule import FileDataModule


def registry() -> dict[str, type[FileDataModule]]:
    """The datamodules ``polytask data check`` and ``polytask evaluate`` know, by dataset name."""
    modules: list[type[FileDataModule]] = [
        PascalContextDataModule,
        NYUDDataModule,
        NYUv2MTANDataModule,
        CityscapesMTANDataModule,
        CelebADataModule,
        FolderDataModule,
    ]
    return {m.name: m for m in modules}


def datamodule_class(class_path: str) -> type[MultiTaskDataModule]:
    """The datamodule class a config names (``polytask.data.SynthScenesDataModule``)."""
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def build_datamodule(data: Any) -> MultiTaskDataModule:
    """The datamodule of a resolved config's ``data`` entry, ``{class_path, init_args}`` (a mapping or
    a jsonargparse namespace), built alone: without the model the CLI would build with it.

    Raises:
        Whatever the datamodule's constructor raises (e.g. a missing dataset root).
    """
    plain = data.as_dict() if hasattr(data, "as_dict") else dict(data)
    return datamodule_class(plain["class_path"])(**dict(plain.get("init_args") or {}))
