"""Task definitions: registry, post-processing, metrics wiring, colourisation."""

import numpy as np
import pytest
import torch

from polytask.tasks import TASK_REGISTRY, build_task, select_tasks


def test_registry_builds_every_kind_with_its_channels() -> None:
    channels = {
        "semseg": build_task("semseg", num_classes=21).out_channels,
        "human_parts": build_task("human_parts", num_classes=7).out_channels,
        "binary_seg": build_task("binary_seg", name="seg_bed").out_channels,
        "sal": build_task("sal").out_channels,
        "normals": build_task("normals").out_channels,
        "edge": build_task("edge").out_channels,
        "depth": build_task("depth").out_channels,
        "attributes": build_task("attributes", name="eyes", attribute_names=list("abcde")).out_channels,
        "classification": build_task("classification", name="digit", num_classes=10).out_channels,
    }
    assert channels == {
        "semseg": 21, "human_parts": 7, "binary_seg": 1, "sal": 2, "normals": 3, "edge": 1, "depth": 1, "attributes": 5, "classification": 10,
    }
    assert set(TASK_REGISTRY) == set(channels)


def test_bad_task_options_are_reported() -> None:
    with pytest.raises(ValueError, match="unknown task kind 'segm'"):
        build_task("segm")
    with pytest.raises(TypeError, match="task kind 'depth': bad options"):
        build_task("depth", num_classes=3)
    with pytest.raises(ValueError, match="2 class names given for 3 classes"):
        build_task("semseg", num_classes=3, class_names=["a", "b"])


def test_select_tasks_names_the_dataset_and_what_it_carries() -> None:
    tasks = [build_task("semseg", num_classes=2), build_task("depth")]
    assert [t.name for t in select_tasks(tasks, ["depth"], "nyud")] == ["depth"]
    with pytest.raises(ValueError, match=r"nyud does not carry task\(s\) \['sal'\]"):
        select_tasks(tasks, ["sal", "depth"], "nyud")


def test_postprocess_produces_the_prediction_contract() -> None:
    sal = build_task("sal").postprocess(torch.tensor([0.0, 2.0]).view(1, 2, 1, 1))
    assert sal.shape == (1, 1, 1) and torch.isclose(sal, torch.sigmoid(torch.tensor(2.0))).all()
    normals = build_task("normals").postprocess(torch.tensor([3.0, 0.0, 4.0]).view(1, 3, 1, 1))
    assert torch.allclose(normals.flatten(), torch.tensor([0.6, 0.0, 0.8]))
    seg = build_task("semseg", num_classes=3).postprocess(torch.tensor([0.1, 0.9, 0.3]).view(1, 3, 1, 1))
    assert seg.dtype == torch.int64 and seg.item() == 1
    depth = build_task("depth").postprocess(torch.tensor([-1.0, 2.0]).view(1, 1, 1, 2))
    assert depth.flatten().tolist() == [0.0, 2.0]
    edge = build_task("edge").postprocess(torch.zeros(1, 1, 1, 1))
    assert edge.item() == 0.5


def test_each_task_metric_scores_a_perfect_prediction_perfectly() -> None:
    task = build_task("semseg", num_classes=3)
    target = torch.tensor([[[0, 1, 2, 255]]])
    metric = task.make_metric()
    metric.update(target.clamp(max=2), target)
    assert metric.compute()["mIoU"] == pytest.approx(100.0)
    normals = build_task("normals")
    n = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    m = normals.make_metric()
    m.update(n, n)
    assert m.compute()["mean"] == pytest.approx(0.0, abs=1e-3)


def test_colorize_returns_rgb_images() -> None:
    seg = build_task("semseg", num_classes=4).colorize(torch.tensor([[0, 3], [255, 1]]))
    assert seg.shape == (2, 2, 3) and seg.dtype == np.uint8
    assert (seg[1, 0] == 0).all() and not (seg[0, 1] == 0).all()
    normals = build_task("normals").colorize(torch.tensor([1.0, -1.0, 0.0]).view(3, 1, 1))
    assert normals[0, 0].tolist() == [255, 0, 128]
    depth = build_task("depth").colorize(torch.tensor([[[0.0, 1.0, 2.0]]]))
    assert depth.shape == (1, 3, 3) and (depth[0, 0] == 0).all()
