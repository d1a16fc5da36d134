"""Datasets, joint transforms and Lightning datamodules."""

from polytask.data.celeba import CelebADataModule
from polytask.data.check import BrokenDatasetError, CheckReport, FileDataModule, check_dataset
from polytask.data.datamodule import MultiTaskDataModule, SynthScenesDataModule
from polytask.data.digits import DigitsDataModule
from polytask.data.folder import FolderDataModule
from polytask.data.mtan import CityscapesMTANDataModule, NYUv2MTANDataModule
from polytask.data.nyud import NYUDDataModule
from polytask.data.pascal_context import PascalContextDataModule

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
