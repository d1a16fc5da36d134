"""Datasets declare what depends on them: no dataset names in the generic layers, and the values a
datamodule declares (``prediction_files``, ``boundary_protocol``, ``maximum_roaming_batch_size``)
are the ones ``polytask evaluate`` uses and reports."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import polytask
import polytask.data as data_package
from fixtures_data import write_nyud
from polytask.cli.evaluate import main as evaluate_main
from polytask.data import MultiTaskDataModule, NYUDDataModule, NYUv2MTANDataModule
from polytask.data.file_datamodule import FileDataModule
from polytask.data.protocols import BoundaryProtocol, PublishedIdList, id_list_sha256
from polytask.data.registry import registry
from polytask.evaluation import BoundaryODSMetric
from polytask.evaluation.evaluate import (
    DATASETS,
    EvaluationSetupError,
    boundary_protocols,
    evaluate_predictions,
    maximum_roaming_batch_sizes,
    protocol_batch_size,
)
from polytask.evaluation.prediction_io import write_prediction

SOURCE = Path(polytask.__file__).parent
DATASET_DEFINITIONS = "data/datasets"
"""Dataset definitions (one module per dataset) name themselves: they are like configs."""


def _dataset_names() -> set[str]:
    """The name of every registered dataset and of every datamodule polytask.data exports."""
    exported = {
        value.name
        for value in vars(data_package).values()
        if isinstance(value, type) and issubclass(value, MultiTaskDataModule) and value.name != MultiTaskDataModule.name
    }
    return set(registry()) | exported


def test_no_dataset_name_literals_in_the_generic_layers() -> None:
    names = _dataset_names()
    assert {"pascal_context", "nyud", "celeba", "folder", "synthscenes", "digits"} <= names
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE).as_posix()
        if relative.startswith(f"{DATASET_DEFINITIONS}/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert not found, f"dataset names in generic layers (declare a datamodule hook instead): {found}"


def test_the_declared_hooks_give_the_former_tables() -> None:
    """The values evaluate used to hold by dataset name, now read from the datamodule classes."""
    assert FileDataModule.prediction_files and FileDataModule.boundary_protocol is None
    assert FileDataModule.maximum_roaming_batch_size is None
    assert DATASETS == ("pascal_context", "nyud", "nyuv2_mtan", "cityscapes_mtan", "folder")  # not celeba
    assert maximum_roaming_batch_sizes() == {"nyuv2_mtan": 2, "cityscapes_mtan": 8}
    protocols = boundary_protocols()
    assert {n: (p.max_dist, p.ground_truth) for n, p in protocols.items()} == {
        "pascal_context": (0.0075, "seg2bmap(LabelMap)"),
        "nyud": (0.011, "seg2bmap(edge map)"),
    }
    assert protocols["nyud"].test_new is None  # SEISM's NYUD test_new: every val image
    test_new = protocols["pascal_context"].test_new
    assert test_new is not None and test_new.size == 2498
    assert test_new.sha256 == "1998ea178a4683c851a7db0c5c6d41dcbc026e9502d4a6f10bb3668862cff0ce"
    assert not test_new.matches(["a", "b"])
    two = replace(test_new, sha256=id_list_sha256(["a", "b"]))
    assert two.matches(["b", "a", "a"]) and not two.matches(["a"])  # order and repeats do not matter


def test_maximum_roaming_batch_size_comes_from_the_datamodule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert protocol_batch_size("nyuv2_mtan", "maximum_roaming", None) == 2
    monkeypatch.setattr(NYUv2MTANDataModule, "maximum_roaming_batch_size", 3)
    assert protocol_batch_size("nyuv2_mtan", "maximum_roaming", None) == 3
    monkeypatch.setattr(NYUv2MTANDataModule, "maximum_roaming_batch_size", None)
    with pytest.raises(EvaluationSetupError, match=r"defined for \['cityscapes_mtan'\] .*not for 'nyuv2_mtan'"):
        protocol_batch_size("nyuv2_mtan", "maximum_roaming", None)


@pytest.fixture()
def nyud_edges(tmp_path: Path) -> tuple[Path, Path, list[str], list[torch.Tensor]]:
    """A NYUD fixture (2 val images) and edge predictions: the root, the prediction folder, the val
    ids and the predictions."""
    write_nyud(tmp_path / "nyud", "atrc")
    module = NYUDDataModule(tmp_path / "nyud", tasks=["edge"])
    dataset = module.build_split("val", module.tasks)
    (edge,) = module.tasks
    g = torch.Generator().manual_seed(0)
    preds = []
    for index, sample_id in enumerate(dataset.ids):
        target = dataset.validated_target(index, "edge")
        pred = (0.7 * target + 0.3 * torch.rand(target.shape, generator=g)).clamp(0, 1)
        write_prediction(tmp_path / "PRED", edge, sample_id, pred)
        preds.append(pred)
    return tmp_path / "nyud", tmp_path / "PRED", list(dataset.ids), preds


def _seism_ods(root: Path, preds: list[torch.Tensor], max_dist: float) -> float:
    """odsF in memory: the edge PNG read as a label map, as NYUD's SEISM ground truth."""
    module = NYUDDataModule(root, tasks=["edge"])
    dataset = module.build_split("val", module.tasks)
    metric = BoundaryODSMetric(max_dist, gt_labels=True)
    for index, pred in enumerate(preds):
        metric.update(pred[None], dataset.validated_target(index, "edge")[None])
    return float(metric.compute()["odsF"])


def test_a_declared_boundary_protocol_reaches_the_scores_the_notes_and_the_json(
    nyud_edges: tuple[Path, Path, list[str], list[torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, pred_dir, _, preds = nyud_edges
    monkeypatch.setattr(NYUDDataModule, "boundary_protocol", BoundaryProtocol(0.02, "seg2bmap(declared map)"))
    report = evaluate_predictions("nyud", root, pred_dir, tasks=["edge"])
    assert report.ok, report.problems
    assert any("against thin(seg2bmap(declared map)), maxDist 0.02 x diagonal" in note for note in report.notes), report.notes
    declared = _seism_ods(root, preds, 0.02)
    assert report.results["edge"]["odsF"] == pytest.approx(declared, rel=1e-12)
    assert declared != pytest.approx(_seism_ods(root, preds, 0.011))  # the tolerance matters here

    out = tmp_path / "eval.json"
    assert evaluate_main(["--dataset", "nyud", "--root", str(root), "--pred-dir", str(pred_dir), "--tasks", "edge", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["boundary"] == {
        "subset": "all", "ids_file": None, "n_images": 2, "max_dist": 0.02, "ground_truth": "thin(seg2bmap(declared map))",
    }


def test_a_declared_test_new_list_is_required_and_recognised(
    nyud_edges: tuple[Path, Path, list[str], list[torch.Tensor]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, pred_dir, ids, _ = nyud_edges
    listed = PublishedIdList(id_list_sha256(ids), len(ids), "lists/test_new.txt", "Declared")
    monkeypatch.setattr(NYUDDataModule, "boundary_protocol", replace(NYUDDataModule.boundary_protocol, test_new=listed))
    with pytest.raises(EvaluationSetupError, match="Declared boundary subset test_new needs its id list: pass --boundary-ids lists/test_new.txt"):
        evaluate_predictions("nyud", root, pred_dir, tasks=["edge"], boundary_subset="test_new")
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(reversed(ids)) + "\n")
    report = evaluate_predictions("nyud", root, pred_dir, tasks=["edge"], boundary_ids=ids_file)
    assert report.settings["boundary"]["subset"] == "test_new"  # recognised by its hash
    ids_file.write_text(ids[0] + "\n")
    with pytest.raises(EvaluationSetupError, match=r"is not SEISM's Declared test_new list \(2 ids, sha256 "):
        evaluate_predictions("nyud", root, pred_dir, tasks=["edge"], boundary_subset="test_new", boundary_ids=ids_file)


def test_without_a_boundary_protocol_edges_get_f_tol_only(
    nyud_edges: tuple[Path, Path, list[str], list[torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, pred_dir, _, _ = nyud_edges
    monkeypatch.setattr(NYUDDataModule, "boundary_protocol", None)
    report = evaluate_predictions("nyud", root, pred_dir, tasks=["edge"])
    assert set(report.results["edge"]) == {"F_tol"}
    assert report.settings["boundary"]["max_dist"] is None
    assert report.settings["boundary"]["ground_truth"] == "the edge target (F_tol only)"
    assert any(note.endswith("SEISM odsF/oisF/ap are defined for pascal_context only") for note in report.notes)
    with pytest.raises(EvaluationSetupError, match=r"SEISM's list of \['pascal_context'\], not of 'nyud'"):
        evaluate_predictions("nyud", root, pred_dir, tasks=["edge"], boundary_subset="test_new")
