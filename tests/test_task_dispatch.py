"""Tasks own their behaviour: no type or name dispatch on tasks outside polytask.tasks, and the
per-kind methods (target checks, random targets, prediction codec, resizing, hooks) behave."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import polytask
import polytask.tasks as tasks_package
from polytask.data.transforms import crop_balance_key, empty_ignored_keys, train_transform, transform_kinds
from polytask.metrics import AttributeMetric
from polytask.profiling.inputs import synthetic_batch
from polytask.tasks import (
    ALL_ATTRIBUTES,
    TASK_REGISTRY,
    AttributeTask,
    ImageClassificationTask,
    SaliencyTask,
    TargetError,
    Task,
    build_task,
)

SOURCE = Path(polytask.__file__).parent
TASK_NAMES = frozenset({"semseg", "human_parts", "sal", "normals", "edge", "depth", "attributes", "classification", "binary_seg"})
DATASET_DEFINITIONS = "data/datasets"
"""Dataset definitions (one module per dataset) may name the tasks they publish: they are like configs."""
SIZE = (5, 7)


def _task_classes() -> set[str]:
    """Names of every Task subclass polytask.tasks defines (Task itself excluded)."""
    return {
        name
        for name, value in vars(tasks_package).items()
        if isinstance(value, type) and issubclass(value, Task) and value is not Task
    }


def _generic_modules() -> list[Path]:
    return sorted(p for p in SOURCE.rglob("*.py") if p.relative_to(SOURCE).parts[0] != "tasks")


def _is_dataset_definition(path: Path) -> bool:
    return path.relative_to(SOURCE).as_posix().startswith(f"{DATASET_DEFINITIONS}/")


def _names_in(node: ast.expr) -> set[str]:
    """Class names an isinstance / issubclass second argument refers to (names, attributes, tuples, unions)."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def test_no_isinstance_on_task_classes_outside_the_tasks_package() -> None:
    classes = _task_classes()
    assert {"SegmentationTask", "ImageClassificationTask", "AttributeTask"} <= classes
    found = []
    for path in _generic_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass")
                and len(node.args) == 2
                and _names_in(node.args[1]) & classes
            ):
                found.append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    assert not found, f"type dispatch on Task subclasses outside polytask/tasks: {found}"


def test_no_task_name_literals_in_the_generic_layers() -> None:
    assert TASK_NAMES == set(TASK_REGISTRY)
    found = []
    for path in _generic_modules():
        if _is_dataset_definition(path):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
                found.append(f"{path.relative_to(SOURCE)}:{node.lineno}: {node.value!r}")
    assert not found, f"task names in generic layers: {found}"


def _every_kind() -> list[Task]:
    return [
        build_task("semseg", num_classes=4),
        build_task("human_parts", num_classes=3),
        build_task("binary_seg", name="seg_bed"),
        build_task("sal"),
        build_task("normals"),
        build_task("edge"),
        build_task("depth"),
        build_task("attributes", name="eyes", attribute_names=["a", "b", "c"]),
        build_task("classification", name="digit", num_classes=10),
    ]


@pytest.mark.parametrize("task", _every_kind(), ids=lambda t: t.name)
def test_random_targets_pass_their_own_check(task: Task) -> None:
    batch = task.random_target(3, SIZE, torch.Generator().manual_seed(1))
    assert tuple(batch.shape) == (3, *task.value_shape(SIZE)) and batch.dtype == task.target_dtype
    for value in batch:
        task.check_target(value, SIZE)
    again = task.random_target(3, SIZE, torch.Generator().manual_seed(1))
    assert torch.equal(batch, again)


def test_random_targets_hold_the_values_of_their_kind() -> None:
    g = torch.Generator().manual_seed(0)
    seg = build_task("semseg", num_classes=4).random_target(2, (40, 40), g)
    assert set(seg.unique().tolist()) == {0, 1, 2, 3}
    normals = build_task("normals").random_target(2, SIZE, g)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, *SIZE))
    depth = build_task("depth").random_target(2, SIZE, g)
    assert 0.5 <= float(depth.min()) and float(depth.max()) < 10.0
    edge = build_task("edge").random_target(2, SIZE, g)
    assert set(edge.unique().tolist()) <= {0.0, 1.0}
    digit = build_task("classification", name="digit", num_classes=10).random_target(50, SIZE, g)
    assert digit.shape == (50,) and 0 <= int(digit.min()) and int(digit.max()) <= 9


@pytest.mark.parametrize(
    ("task", "value", "message"),
    [
        (build_task("semseg", num_classes=4), torch.tensor([[0, 4], [255, 1]]), r"task 'semseg' \(SegmentationTask\): class id\(s\) \[4\] outside 0..3"),
        (build_task("semseg", num_classes=4), torch.zeros(2, 3, dtype=torch.long), r"task 'semseg'.*shape \(2, 2\).*got \(2, 3\)"),
        (build_task("semseg", num_classes=4), torch.zeros(2, 2), r"task 'semseg'.*torch.int64 target, got torch.float32"),
        (build_task("sal"), torch.tensor([[0, 2], [1, 1]]), r"task 'sal'.*class id\(s\) \[2\] outside 0..1"),
        (build_task("depth"), torch.tensor([[[1.0, -1.0], [0.0, 2.0]]]), r"task 'depth'.*negative depth"),
        (build_task("depth"), torch.tensor([[[1.0, float("nan")], [0.0, 2.0]]]), r"task 'depth'.*1 NaN value"),
        (build_task("edge"), torch.tensor([[[2.0, 1.0], [0.0, 255.0]]]), r"task 'edge'.*boundary values outside \[0, 1\]"),
        (build_task("normals"), torch.zeros(1, 2, 2), r"task 'normals'.*shape \(3, 2, 2\)"),
        (AttributeTask("eyes", ["a", "b"]), torch.tensor([0.0, 0.5]), r"task 'eyes'.*attribute values other than 0 / 1"),
        (ImageClassificationTask("digit", 10), torch.tensor(10), r"task 'digit' \(ImageClassificationTask\): class id\(s\) \[10\] outside 0..9$"),
        (ImageClassificationTask("digit", 10), torch.tensor([3]), r"task 'digit'.*shape \(\).*got \(1,\)"),
    ],
)
def test_a_bad_target_is_reported_with_the_task_name(task: Task, value: torch.Tensor, message: str) -> None:
    with pytest.raises(TargetError, match=message):
        task.check_target(value, (2, 2))


def test_ignore_is_a_valid_label_but_not_a_valid_class_id() -> None:
    build_task("semseg", num_classes=4).check_target(torch.tensor([[255, 3], [0, 1]]), (2, 2))
    assert build_task("semseg", num_classes=4).target_problems(torch.tensor([255])) == []
    assert ImageClassificationTask("digit", 10).target_problems(torch.tensor([255]))[0][0] == "out_of_range"


def test_image_classification_runs_through_the_synthetic_batch() -> None:
    tasks = [ImageClassificationTask("digit", 10), build_task("semseg", num_classes=3)]
    batch = synthetic_batch(tasks, 4, (6, 8), torch.device("cpu"))
    assert batch["image"].shape == (4, 3, 6, 8)
    assert batch["digit"].shape == (4,) and batch["digit"].dtype == torch.int64
    for value in batch["digit"]:
        tasks[0].check_target(value, (6, 8))
    logits = torch.zeros(4, 10, requires_grad=True)
    tasks[0].loss(logits, batch["digit"]).backward()
    assert logits.grad is not None
    assert torch.equal(synthetic_batch(tasks, 4, (6, 8), torch.device("cpu"))["digit"], batch["digit"])


def test_synthetic_batch_draws_what_the_kinds_drew_before() -> None:
    """The draws of the former type switch, in the same generator order (bench numbers stay comparable)."""
    tasks = [build_task("semseg", num_classes=5), build_task("normals"), build_task("edge"), build_task("depth")]
    batch = synthetic_batch(tasks, 2, (4, 6), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(batch["image"], torch.randn(2, 3, 4, 6, generator=g), rtol=0, atol=0)
    assert torch.equal(batch["semseg"], torch.randint(0, 5, (2, 4, 6), generator=g))
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 4, 6, generator=g), dim=1)
    torch.testing.assert_close(batch["normals"], normals, rtol=0, atol=0)
    assert torch.equal(batch["edge"], (torch.rand(2, 1, 4, 6, generator=g) < 0.1).float())
    torch.testing.assert_close(batch["depth"], 0.5 + 9.5 * torch.rand(2, 1, 4, 6, generator=g), rtol=0, atol=0)


def test_transform_roles_come_from_the_tasks() -> None:
    tasks = [build_task("normals", name="n"), build_task("human_parts", name="parts", num_classes=3),
             build_task("semseg", name="material", num_classes=3), build_task("depth", name="z"),
             build_task("attributes", name="eyes", attribute_names=["a"])]
    assert transform_kinds(tasks) == {"n": "direction", "parts": "label", "material": "label", "z": "distance"}
    assert crop_balance_key(tasks) == "material" and crop_balance_key(tasks[:1]) is None
    assert empty_ignored_keys(tasks) == ["parts"]


def test_train_transform_balances_crops_on_the_segmentation_only() -> None:
    """A one-class target re-draws the crop when it is a segmentation, not when it is a part target."""
    sample = {"image": torch.zeros(3, 20, 20), "labels": torch.ones(20, 20, dtype=torch.long)}

    def state_after(task: Task) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        out = train_transform((10, 10), [task], generator)(dict(sample))
        assert out["labels"].shape == (10, 10)
        return generator.get_state()

    parts = state_after(build_task("human_parts", name="labels", num_classes=3))
    semseg = state_after(build_task("semseg", name="labels", num_classes=3))
    assert not torch.equal(parts, semseg)


def test_prediction_round_trip_through_the_task_codec() -> None:
    normals = build_task("normals")
    value = torch.nn.functional.normalize(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)), dim=0)
    stored, suffix = normals.encode_prediction(value)
    assert suffix == ".png" and stored.dtype == np.uint8 and stored.shape == (4, 5, 3)
    torch.testing.assert_close(normals.decode_prediction(stored), normals.quantize_prediction(value), rtol=0, atol=0)
    depth = build_task("depth")
    stored, suffix = depth.encode_prediction(torch.tensor([[[1.2344, 2.0]]]), "png16")
    assert suffix == ".png" and stored.tolist() == [[1234, 2000]]
    torch.testing.assert_close(depth.decode_prediction(stored), torch.tensor([[[1.234, 2.0]]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="negative depth -1 m"):
        depth.decode_prediction(np.array([[-1.0]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"class id\(s\) \[7\] outside 0..3"):
        build_task("semseg", num_classes=4).decode_prediction(np.array([[7]], dtype=np.uint8))
    edge = build_task("edge")
    assert edge.decode_prediction(np.zeros((2, 3), dtype=np.float32)).shape == (1, 2, 3)


@pytest.mark.parametrize("task", [AttributeTask("eyes", ["a", "b"]), ImageClassificationTask("digit", 10)], ids=lambda t: t.name)
def test_image_level_tasks_have_every_method(task: Task) -> None:
    assert task.transform_kind is None and task.prediction_format is None and not task.is_boundary
    value = task.postprocess(torch.randn(1, task.out_channels))[0]
    task.check_prediction(value)
    assert task.resize_prediction(value, (3, 3)) is value
    assert task.colorize(value).dtype == np.uint8
    for method in (task.encode_prediction, task.quantize_prediction):
        with pytest.raises(ValueError, match="no prediction file format"):
            method(value)
    with pytest.raises(ValueError, match="no prediction file format"):
        task.decode_prediction(np.zeros(2))
    assert task.with_metric_options(legacy_sigmoid=True) is task and task.metric_settings() == {}


def test_prediction_checks_name_the_task() -> None:
    with pytest.raises(ValueError, match=r"task 'digit': class id 12 outside 0..9"):
        ImageClassificationTask("digit", 10).check_prediction(torch.tensor(12))
    with pytest.raises(ValueError, match=r"task 'eyes': expected one prediction of shape \(2,\)"):
        AttributeTask("eyes", ["a", "b"]).check_prediction(torch.zeros(3))
    with pytest.raises(ValueError, match=r"task 'sal': expected one prediction of shape \(H, W\), got \(1, 2, 2\)"):
        build_task("sal").check_prediction(torch.zeros(1, 2, 2))


def test_resizing_back_follows_the_kind() -> None:
    labels = torch.tensor([[0, 1], [2, 3]])
    assert build_task("semseg", num_classes=4).resize_prediction(labels, (4, 4)).tolist() == [
        [0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]
    ]
    normals = build_task("normals").resize_prediction(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]), (1, 3))
    torch.testing.assert_close(normals.norm(dim=0), torch.ones(1, 3))
    assert build_task("edge").resize_prediction(torch.rand(1, 4, 5), (2, 3)).shape == (1, 2, 3)


def test_metric_options_make_a_new_task_and_leave_the_original() -> None:
    sal = build_task("sal")
    legacy = sal.with_metric_options(legacy_sigmoid=True)
    assert isinstance(legacy, SaliencyTask) and legacy is not sal and legacy.legacy_sigmoid and not sal.legacy_sigmoid
    assert legacy.make_metric().legacy_sigmoid and not sal.make_metric().legacy_sigmoid
    assert sal.with_metric_options(legacy_sigmoid=False) is sal
    assert legacy.metric_settings() == {"sal maxF": "legacy_sigmoid=on"}
    assert build_task("edge").with_metric_options(legacy_sigmoid=True).metric_settings() == {
        "edge": "F_tol: in-training boundary F (2 px tolerance), not SEISM odsF"
    }


def test_module_does_not_modify_the_datamodule_tasks() -> None:
    from functools import partial

    from polytask.models.baselines import HardSharing
    from polytask.training.module import MultiTaskModule

    tasks = [build_task("sal"), build_task("edge")]
    net = partial(HardSharing, backbone="test_resnet", decoder_channels=8, head_channels=4)
    module = MultiTaskModule(net, tasks, legacy_sigmoid=True)
    assert not tasks[0].legacy_sigmoid and module.tasks[0].legacy_sigmoid and module.tasks[1] is tasks[1]
    assert module.metrics["val"]["sal"].legacy_sigmoid
    assert module.evaluation_settings()["sal maxF"] == "legacy_sigmoid=on"


def test_attribute_groups_join_into_one_mean_over_all_attributes() -> None:
    groups = [AttributeTask("eyes", ["a", "b"]), AttributeTask("hair", ["c"])]
    metrics = [g.make_metric() for g in groups]
    metrics[0].update(torch.tensor([[0.9, 0.1]]), torch.tensor([[1.0, 1.0]]))
    metrics[1].update(torch.tensor([[0.9]]), torch.tensor([[1.0]]))
    joint = AttributeTask.joint_results(metrics)
    assert list(joint) == [ALL_ATTRIBUTES]
    assert joint[ALL_ATTRIBUTES]["recall"] == pytest.approx(200.0 / 3)
    assert isinstance(metrics[0], AttributeMetric)
    assert Task.joint_results(metrics) == {} and build_task("depth").joint_results([]) == {}


def test_segmentation_reports_per_class_results_of_its_split_level_metric_only() -> None:
    task = build_task("semseg", num_classes=2, class_names=["bg", "fg"])
    metric = task.make_metric()
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert task.per_class_results(metric) == {"bg": 100.0, "fg": 100.0}
    assert task.per_class_results(task.make_metric("maximum_roaming")) is None
    assert build_task("depth").per_class_results(metric) is None
