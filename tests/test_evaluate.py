"""``polytask evaluate`` on fixture datasets: files written by a Lightning test run score exactly as
the same predictions in memory (after the file quantisation), and bad files are listed by name."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_data import write_mtan_nyuv2, write_nyud, write_pascal_context
from polytask.cli.evaluate import main as evaluate_main
from polytask.config import instantiate
from polytask.data.datasets.mtan import NYUv2MTANDataModule
from polytask.data.datasets.nyud import NYUDDataModule
from polytask.data.datasets.pascal_context import PascalContextDataModule
from polytask.data.datasets.synthscenes import SynthScenesDataModule
from polytask.data.io import mat_array
from polytask.data.protocols import id_list_sha256
from polytask.data.transforms import Pad
from polytask.evaluation import BoundaryODSMetric, segmentation_boundaries
from polytask.evaluation.evaluate import evaluate_predictions
from polytask.evaluation.prediction_io import quantize_prediction, read_prediction, write_prediction
from polytask.models.baselines import HardSharing
from polytask.tasks import EdgeTask, SaliencyTask, Task
from polytask.training.module import MultiTaskModule
from polytask.training.prediction_writer import PredictionWriter

EVAL_SIZE = (45, 51)  # odd padding of the 40x48 fixture images: 2 rows above, 3 below, 1 column left, 2 right
HARD_SHARING = str(Path(__file__).resolve().parents[1] / "configs" / "hard_sharing_synthscenes.yaml")
TINY_MODEL = [
    "--config", HARD_SHARING,
    "--model.net.init_args.backbone", "test_resnet",
    "--model.net.init_args.decoder_channels", "16", "--model.net.init_args.head_channels", "8",
    "--data.batch_size", "2", "--trainer.logger", "false",
]


class Capture(pl.Callback):
    """Keeps every test batch's (padded) predictions, targets and ids."""

    def __init__(self) -> None:
        self.batches: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]] = []

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        names = [t.name for t in pl_module.tasks]
        preds = {n: outputs[n].detach().clone() for n in names}
        self.batches.append((preds, {n: batch[n].clone() for n in names}, list(batch["meta"]["id"])))


def seism_target(label_map: np.ndarray, padded_to: tuple[int, int] | None = None) -> torch.Tensor:
    """``(1, 1, H, W)`` float target of SEISM's ground truth ``seg2bmap(labels)``, padded with 255 like the test batches."""
    bmap = torch.from_numpy(segmentation_boundaries(label_map)).float()[None]
    if padded_to is not None:
        bmap = Pad(padded_to, kinds={"edge": "label"})({"image": torch.zeros(3, *bmap.shape[-2:]), "edge": bmap})["edge"]
    return bmap[None]


@dataclass
class PascalRun:
    root: Path
    pred_dir: Path
    predict_dir: Path
    tasks: list[Task]
    capture: Capture
    in_memory: dict[str, dict[str, float]]


@pytest.fixture(scope="module")
def pascal_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PascalRun]:
    """A tiny model tested on the PASCAL fixture with the PredictionWriter appended from the command line."""
    base = tmp_path_factory.mktemp("pascal")
    write_pascal_context(base / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("POLYTASK_CACHE", str(base / "cache"))
        cli = instantiate(overrides=[
            "--data", "polytask.data.datasets.pascal_context.PascalContextDataModule", "--data.root", str(base / "data"),
            "--data.eval_size", json.dumps(list(EVAL_SIZE)), *TINY_MODEL,
            "--trainer.callbacks+=polytask.training.prediction_writer.PredictionWriter",
            "--trainer.callbacks.out_dir", str(base / "PRED"),
        ])
        capture = Capture()
        cli.trainer.callbacks.append(capture)
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
        writer = next(c for c in cli.trainer.callbacks if isinstance(c, PredictionWriter))
        writer.out_dir = base / "PRED_predict"
        cli.trainer.predict(cli.model, datamodule=cli.datamodule)
        writer.out_dir, writer.stages = base / "PRED_validate", ("validate",)
        cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    torch.set_num_threads(threads)
    tasks, results = list(cli.model.tasks), cli.model.results["test"]
    yield PascalRun(base / "data", base / "PRED", base / "PRED_predict", tasks, capture, results)


def _quantised_in_memory(run: PascalRun, legacy_sigmoid: bool = False) -> dict[str, dict[str, float]]:
    """The metrics of the captured padded predictions, quantised as the files are."""
    results = {}
    for task in run.tasks:
        metric = SaliencyTask(task.name, legacy_sigmoid).make_metric() if isinstance(task, SaliencyTask) else task.make_metric()
        seism = BoundaryODSMetric(PascalContextDataModule.boundary_protocol.max_dist) if isinstance(task, EdgeTask) else None
        for preds, targets, ids in run.capture.batches:
            metric.update(quantize_prediction(task, preds[task.name]), targets[task.name])
            if seism is not None:  # SEISM scores against seg2bmap(LabelMap), not the training target
                label_maps = [mat_array(run.root / "pascal-context" / "trainval" / f"{i}.mat", "LabelMap") for i in ids]
                gt = torch.cat([seism_target(m, EVAL_SIZE) for m in label_maps])
                seism.update(preds[task.name], gt)  # quantises to k / 255 itself
        results[task.name] = {**(seism.compute() if seism is not None else {}), **metric.compute()}
    return {t: {k: float(v) for k, v in m.items()} for t, m in results.items()}


def test_files_of_a_test_run_score_as_the_quantised_predictions_in_memory(pascal_run: PascalRun) -> None:
    files = sorted(p.relative_to(pascal_run.pred_dir).as_posix() for p in pascal_run.pred_dir.rglob("*") if p.is_file())
    tasks, ids = ("edge", "human_parts", "normals", "sal", "semseg"), ("2008_000004", "2008_000005")
    assert files == [f"{t}/{i}.png" for t in (*tasks[:3], "pictures", *tasks[3:]) for i in ids]
    assert Image.open(pascal_run.pred_dir / "semseg" / "2008_000004.png").size == (48, 40)  # padding cropped away
    for path in pascal_run.pred_dir.rglob("*.png"):  # predict_step and validation_step write the same files
        for other in (pascal_run.predict_dir, pascal_run.predict_dir.with_name("PRED_validate")):
            assert (other / path.relative_to(pascal_run.pred_dir)).read_bytes() == path.read_bytes()

    report = evaluate_predictions("pascal_context", pascal_run.root, pascal_run.pred_dir)
    assert report.ok, report.problems
    expected = _quantised_in_memory(pascal_run)
    assert report.results.keys() == expected.keys()
    for task, values in expected.items():
        assert report.results[task] == pytest.approx(values, rel=1e-9, abs=1e-9), task
    # against the unquantised numbers of the test run itself: labels are stored exactly, normals
    # move by at most the angle of a truncation step, sqrt(3) / 127.5 rad = 0.78 degrees
    for task in ("semseg", "human_parts"):
        assert report.results[task] == pytest.approx(pascal_run.in_memory[task], rel=1e-9)
    assert abs(report.results["normals"]["mean"] - pascal_run.in_memory["normals"]["mean"]) < 0.78
    assert report.settings["saliency_legacy_sigmoid"] is False
    assert report.settings["boundary"] == {
        "subset": "all", "ids_file": None, "n_images": 2, "max_dist": 0.0075, "ground_truth": "thin(seg2bmap(LabelMap))",
    }


def test_evaluate_command_legacy_sigmoid_is_stated_and_matches_in_memory(
    pascal_run: PascalRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sal.json"
    args = ["--dataset", "pascal_context", "--root", str(pascal_run.root), "--pred-dir", str(pascal_run.pred_dir)]
    assert evaluate_main([*args, "--tasks", "sal", "semseg", "--legacy-sigmoid", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "legacy_sigmoid=on" in printed and "maxF=" in printed
    payload = json.loads(out.read_text())
    assert payload["settings"] == {"tasks": ["sal", "semseg"], "protocol": "split_level", "saliency_legacy_sigmoid": True}
    assert "protocol=split_level" in printed
    legacy = _quantised_in_memory(pascal_run, legacy_sigmoid=True)
    assert payload["results"]["sal"]["maxF"] == pytest.approx(legacy["sal"]["maxF"], rel=1e-12)
    assert evaluate_main([*args, "--tasks", "sal"]) == 0
    assert "legacy_sigmoid=off" in capsys.readouterr().out


def test_boundary_subsets(pascal_run: PascalRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("2008_000005\n")
    report = evaluate_predictions("pascal_context", pascal_run.root, pascal_run.pred_dir, tasks=["edge"], boundary_ids=ids_file)
    assert report.settings["boundary"]["subset"] == "custom" and report.settings["boundary"]["n_images"] == 1
    (edge,) = [t for t in pascal_run.tasks if isinstance(t, EdgeTask)]
    label_map = mat_array(pascal_run.root / "pascal-context" / "trainval" / "2008_000005.mat", "LabelMap")
    metric = BoundaryODSMetric(PascalContextDataModule.boundary_protocol.max_dist)
    metric.update(read_prediction(pascal_run.pred_dir, edge, "2008_000005", (40, 48))[None], seism_target(label_map))
    assert report.results["edge"]["odsF"] == pytest.approx(float(metric.compute()["odsF"]), rel=1e-12)

    args = ["--dataset", "pascal_context", "--root", str(pascal_run.root), "--pred-dir", str(pascal_run.pred_dir)]
    args += ["--tasks", "edge"]
    assert evaluate_main([*args, "--boundary-subset", "test_new"]) == 2
    assert "needs its id list: pass --boundary-ids" in capsys.readouterr().err
    assert evaluate_main([*args, "--boundary-subset", "test_new", "--boundary-ids", str(ids_file)]) == 2
    assert "is not SEISM's PASCAL-Context test_new list" in capsys.readouterr().err
    ids_file.write_text("2008_000005\n2008_000001\n")
    assert evaluate_main([*args, "--boundary-ids", str(ids_file)]) == 2
    assert "1 id(s) not in the val split: 2008_000001" in capsys.readouterr().err
    assert evaluate_main([*args[:-2], "--tasks", "sal", "--boundary-ids", str(ids_file)]) == 2

    # a list with the recorded SEISM hash is named test_new
    ids_file.write_text("2008_000005\n")
    protocol = PascalContextDataModule.boundary_protocol
    one_id = replace(protocol.test_new, sha256=id_list_sha256(["2008_000005"]))
    monkeypatch.setattr(PascalContextDataModule, "boundary_protocol", replace(protocol, test_new=one_id))
    assert evaluate_main([*args, "--boundary-subset", "test_new", "--boundary-ids", str(ids_file)]) == 0
    assert "subset test_new (1 of 2 ids" in capsys.readouterr().out.replace("\n", " ")


def test_missing_and_malformed_files_are_listed_by_name(pascal_run: PascalRun, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pred = tmp_path / "PRED"
    shutil.copytree(pascal_run.pred_dir, pred)
    (pred / "semseg" / "2008_000004.png").unlink()
    Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8)).save(pred / "sal" / "2008_000005.png")
    Image.fromarray(np.zeros((40, 47, 3), dtype=np.uint8)).save(pred / "normals" / "2008_000004.png")
    (pred / "edge" / "2008_000005.png").write_bytes(b"\x89PNG broken")
    shutil.rmtree(pred / "human_parts")
    out = tmp_path / "results.json"
    args = ["--dataset", "pascal_context", "--root", str(pascal_run.root), "--pred-dir", str(pred), "--json", str(out)]
    assert evaluate_main(args) == 1
    printed = capsys.readouterr().out.replace("\n", " ")
    assert "5 problem(s)" in printed
    for name, detail in (
        ("semseg/2008_000004.png", "file not found"),
        ("sal/2008_000005.png", "mode RGB"),
        ("normals/2008_000004.png", "size 40x47 differs from the ground truth's 40x48"),
        ("edge/2008_000005.png", "not a readable image"),
        ("human_parts", "folder missing"),
    ):
        assert f"{pred / name}" in printed and detail in printed, name
    assert not out.exists()

    # values are checked when the files are decoded; those problems are listed the same way
    shutil.rmtree(pred)
    shutil.copytree(pascal_run.pred_dir, pred)
    Image.fromarray(np.full((40, 48), 30, dtype=np.uint8)).save(pred / "semseg" / "2008_000005.png")
    assert evaluate_main(args) == 1
    printed = capsys.readouterr().out.replace("\n", " ")
    assert f"{pred / 'semseg' / '2008_000005.png'}" in printed and "class id(s) [30] outside 0..20" in printed
    assert not out.exists()


def test_nyud_hand_built_predictions(tmp_path: Path, one_thread: None) -> None:
    """Ignore regions, absent classes, mixed depth formats and the worker pool on NYUD."""
    write_nyud(tmp_path / "nyud", "atrc")
    module = NYUDDataModule(tmp_path / "nyud")
    dataset = module.build_split("val", module.tasks)
    g = torch.Generator().manual_seed(3)
    metrics = {t.name: t.make_metric() for t in module.tasks}
    seism = BoundaryODSMetric(NYUDDataModule.boundary_protocol.max_dist)
    present = set()
    for index, sample_id in enumerate(dataset.ids):
        depth_format = ("npy", "png16")[index % 2]
        for task in module.tasks:
            target = dataset.validated_target(index, task.name)
            if task.name == "semseg":  # right wherever labelled, class 0 on the ignored (unlabelled) pixels
                pred = torch.where(target == 255, 0, target)
                present |= set(target[target != 255].tolist())
            elif task.name == "depth":
                pred = (target + 0.3 * torch.randn(target.shape, generator=g)).clamp(min=0)
            elif task.name == "normals":
                pred = torch.nn.functional.normalize(target + 0.3 * torch.randn(target.shape, generator=g), dim=0)
            else:
                pred = (0.7 * target + 0.3 * torch.rand(target.shape, generator=g)).clamp(0, 1)
            write_prediction(tmp_path / "PRED", task, sample_id, pred, depth_format)
            metrics[task.name].update(quantize_prediction(task, pred, depth_format)[None], target[None])
            if task.name == "edge":  # SEISM reads the edge map as a label map: seg2bmap of it
                seism.update(pred[None], seism_target(target[0].numpy()))
    assert (tmp_path / "PRED" / "depth" / f"{dataset.ids[1]}.png").is_file()

    report = evaluate_predictions("nyud", tmp_path / "nyud", tmp_path / "PRED", workers=2, boundary_subset="test_new")
    assert report.ok, report.problems
    assert report.settings["boundary"] == {
        "subset": "test_new", "ids_file": None, "n_images": 2, "max_dist": 0.011, "ground_truth": "thin(seg2bmap(edge map))",
    }
    assert report.results["semseg"]["mIoU"] == pytest.approx(100.0 * len(present) / 40)  # absent classes score 0
    assert report.results["semseg"]["pixel_acc"] == pytest.approx(100.0)
    for task, metric in metrics.items():
        expected = {k: float(v) for k, v in metric.compute().items()}
        if task == "edge":
            expected |= {k: float(v) for k, v in seism.compute().items()}
        assert report.results[task] == pytest.approx(expected, rel=1e-9, abs=1e-9), task


def test_images_without_parts_and_ignored_pixels_do_not_count(tmp_path: Path) -> None:
    write_pascal_context(tmp_path / "data")
    module = PascalContextDataModule(tmp_path / "data", tasks=["semseg", "human_parts"])
    dataset = module.build_split("val", module.tasks)
    present: dict[str, set[int]] = {"semseg": set(), "human_parts": set()}
    for index, sample_id in enumerate(dataset.ids):
        for task in module.tasks:
            target = dataset.validated_target(index, task.name)
            present[task.name] |= set(target[target != 255].tolist())
            write_prediction(tmp_path / "PRED", task, sample_id, torch.where(target == 255, 1, target))
    # 2008_000005's person has an empty mask: its parts target is all-ignore
    assert bool((dataset.validated_target(1, "human_parts") == 255).all())
    report = evaluate_predictions("pascal_context", tmp_path / "data", tmp_path / "PRED", tasks=["semseg", "human_parts"])
    assert report.results["semseg"] == pytest.approx({"mIoU": 100.0 * len(present["semseg"]) / 21, "pixel_acc": 100.0})
    assert report.results["human_parts"] == pytest.approx({"mIoU": 100.0 * len(present["human_parts"]) / 7, "pixel_acc": 100.0})


@pytest.fixture()
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared machine
    yield
    torch.set_num_threads(threads)


def test_predict_dir_images_are_written_at_their_own_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in (("wide.png", (20, 30)), ("tall.jpg", (50, 40))):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / name)
    datamodule = SynthScenesDataModule(
        tasks=["semseg", "normals"], num_train=2, num_val=2, image_size=(32, 48), cache_dir=str(tmp_path / "cache"),
        eval_batch_size=2, predict_dir=str(folder), predict_size=(32, 48),
    )
    net = functools.partial(HardSharing, backbone="test_resnet", decoder_channels=16, head_channels=8)
    model = MultiTaskModule(net, datamodule.tasks)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[PredictionWriter(str(tmp_path / "PRED"))])
    trainer.predict(model, datamodule=datamodule)
    (normals,) = [t for t in datamodule.tasks if t.name == "normals"]
    for name, shape in (("wide.png", (20, 30)), ("tall.jpg", (50, 40))):
        assert np.asarray(Image.open(tmp_path / "PRED" / "semseg" / f"{name}.png")).shape == shape
        decoded = read_prediction(tmp_path / "PRED", normals, name, shape)
        assert decoded.norm(dim=0).sub(1).abs().max() < 0.02  # resized back and renormalised


def test_maximum_roaming_protocol_scores_batches_of_consecutive_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    """MTAN NYUv2 files under protocol maximum_roaming: batches of 2 consecutive ids (3 images: 2 + 1)."""
    write_mtan_nyuv2(tmp_path / "nyuv2", n_val=3)
    module = NYUv2MTANDataModule(tmp_path / "nyuv2")
    dataset = module.build_split("val", module.tasks)
    g = torch.Generator().manual_seed(5)
    samples: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {t.name: [] for t in module.tasks}
    for index, sample_id in enumerate(dataset.ids):
        for task in module.tasks:
            target = dataset.validated_target(index, task.name)
            if task.name == "semseg":
                pred = torch.randint(0, 13, target.shape, generator=g)
            elif task.name == "depth":
                pred = (target + torch.randn(target.shape, generator=g)).clamp(min=0)
            else:
                pred = torch.nn.functional.normalize(target + 0.5 * torch.randn(target.shape, generator=g), dim=0)
            write_prediction(tmp_path / "PRED", task, sample_id, pred)
            samples[task.name].append((quantize_prediction(task, pred), target))

    def in_memory(batch_size: int) -> dict[str, dict[str, float]]:
        results = {}
        for task in module.tasks:
            metric = task.make_metric("maximum_roaming")
            pairs = samples[task.name]
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                metric.update(torch.stack([p for p, _ in chunk]), torch.stack([t for _, t in chunk]))
            results[task.name] = {k: float(v) for k, v in metric.compute().items()}
        return results

    args = ["--dataset", "nyuv2_mtan", "--root", str(tmp_path / "nyuv2"), "--pred-dir", str(tmp_path / "PRED")]
    out = tmp_path / "mr.json"
    assert evaluate_main([*args, "--protocol", "maximum_roaming", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "protocol=maximum_roaming" in printed and "2 consecutive ids" in printed
    payload = json.loads(out.read_text())
    assert payload["settings"] == {"tasks": ["semseg", "depth", "normals"], "protocol": "maximum_roaming", "batch_size": 2}
    expected = in_memory(2)
    for task in ("semseg", "depth", "normals"):
        assert payload["results"][task] == pytest.approx(expected[task], rel=1e-9, abs=1e-9), task
        assert payload["results"][task]["batch_size"] == 2
    # per-batch averages change with the batch size; the split-level numbers are another thing again
    report = evaluate_predictions(
        "nyuv2_mtan", tmp_path / "nyuv2", tmp_path / "PRED", protocol="maximum_roaming", batch_size=3
    )
    assert report.results["depth"] == pytest.approx(in_memory(3)["depth"], rel=1e-9)
    assert report.results["depth"]["abs_err"] != pytest.approx(expected["depth"]["abs_err"], rel=1e-6)
    split_level = evaluate_predictions("nyuv2_mtan", tmp_path / "nyuv2", tmp_path / "PRED")
    assert split_level.settings["protocol"] == "split_level" and "batch_size" not in split_level.results["depth"]

    assert evaluate_main([*args, "--batch-size", "4"]) == 2
    assert "applies to --protocol maximum_roaming only" in capsys.readouterr().err
    pascal = ["--dataset", "pascal_context", "--root", str(tmp_path / "nyuv2"), "--pred-dir", str(tmp_path / "PRED")]
    assert evaluate_main([*pascal, "--protocol", "maximum_roaming"]) == 2
    assert "protocol maximum_roaming is defined for" in capsys.readouterr().err
