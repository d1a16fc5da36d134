"""Datasets, joint transforms and Lightning datamodules."""

from polytask.data.check import CheckReport, check_dataset
from polytask.data.datamodule import MultiTaskDataModule
from polytask.data.datasets.celeba import CelebADataModule
from polytask.data.datasets.digits import DigitsDataModule
from polytask.data.datasets.folder import FolderDataModule
from polytask.data.datasets.mtan import CityscapesMTANDataModule, NYUv2MTANDataModule
from polytask.data.datasets.nyud import NYUDDataModule
from polytask.data.datasets.pascal_context import PascalContextDataModule
from polytask.data.datasets.synthscenes import SynthScenesDataModule
from polytask.data.file_datamodule import FileDataModule
from polytask.data.problems import BrokenDatasetError

__all__ = [
    "BrokenDatasetError",
    "CelebADataModule",
    "CheckReport",
    "CityscapesMTANDataModule",
    "DigitsDataModule",
    "FileDataModule",
    "FolderDataModule",
    "MultiTaskDataModule",
    "NYUDDataModule",
    "NYUv2MTANDataModule",
    "PascalContextDataModule",
    "SynthScenesDataModule",
    "check_dataset",
]
