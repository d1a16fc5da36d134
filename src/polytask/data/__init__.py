"""Datasets, joint transforms and Lightning datamodules."""

from polytask.data.datamodule import MultiTaskDataModule, SynthScenesDataModule

__all__ = ["MultiTaskDataModule", "SynthScenesDataModule"]
