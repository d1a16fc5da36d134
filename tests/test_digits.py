"""Digit pairs: images, labels, splits, and the image-level classification task."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from polytask.constants import IMAGENET_MEAN, IMAGENET_STD
from polytask.data.datasets.digits import DigitPairs, DigitsDataModule
from polytask.tasks import ImageClassificationTask


def test_samples_show_the_two_digits_and_carry_their_labels() -> None:
    digits = load_digits()
    data = DigitPairs("train", num_samples=50, scale=2, seed=1)
    for index in range(len(data)):
        sample = data[index]
        assert sample["image"].shape == (3, 16, 32) and sample["image"].dtype == torch.float32
        left, right = int(data.left_index[index]), int(data.right_index[index])
        assert sample["left"].item() == digits.target[left] and sample["right"].item() == digits.target[right]
        assert sample["parity"].item() == (digits.target[left] + digits.target[right]) % 2
        assert sample["compare"].item() == int(np.sign(digits.target[left] - digits.target[right])) + 1
        assert all(sample[k].dtype == torch.int64 and sample[k].dim() == 0 for k in ("left", "right", "parity", "compare"))
        grey = sample["image"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        for half, source in ((grey[:, :16], left), (grey[:, 16:], right)):
            # averaging the upsampled digit back over 2x2 blocks recovers the 8x8 source up to bilinear blur
            recovered = F.avg_pool2d(half[None, None], 2)[0, 0]
            expected = torch.from_numpy(digits.images[source]).float() / 16
            assert torch.corrcoef(torch.stack([recovered.flatten(), expected.flatten()]))[0, 1] > 0.9
        torch.testing.assert_close(sample["image"][1] * IMAGENET_STD[1] + IMAGENET_MEAN[1], grey)


def test_splits_use_disjoint_digit_pools_and_are_deterministic() -> None:
    pools = {split: set(DigitPairs(split, 2000, seed=0).left_index.tolist()) for split in ("train", "val", "test")}
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"] and not pools["val"] & pools["test"]
    a, b = DigitPairs("val", 20, seed=3), DigitPairs("val", 20, seed=3)
    assert np.array_equal(a.left_index, b.left_index) and np.array_equal(a.right_index, b.right_index)
    assert not np.array_equal(a.left_index, DigitPairs("val", 20, seed=4).left_index)


def test_all_four_tasks_occur_with_every_class() -> None:
    data = DigitPairs("train", 2000, seed=0)
    for name, classes in (("left", 10), ("right", 10), ("parity", 2), ("compare", 3)):
        assert set(data.labels[name].tolist()) == set(range(classes))


def test_datamodule_selects_tasks_and_batches_them() -> None:
    dm = DigitsDataModule(tasks=["parity", "left"], num_train=10, num_val=6, scale=1, batch_size=4)
    assert dm.task_names == ["parity", "left"] and dm.loss_weights == {"parity": 1.0, "left": 1.0}
    assert [t.out_channels for t in dm.tasks] == [2, 10]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 8, 16)
    assert batch["left"].shape == (4,) and "right" not in batch
    assert len(dm.test_dataloader().dataset) == 6


def test_image_classification_task_scores_accuracy_over_the_split() -> None:
    task = ImageClassificationTask("left", 3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 0, 0])
    torch.testing.assert_close(task.loss(logits, target), F.cross_entropy(logits, target))
    metric = task.make_metric()
    metric.update(task.postprocess(logits[:2]), target[:2])
    metric.update(task.postprocess(logits[2:]), target[2:])
    assert metric.compute()["accuracy"].item() == 75.0
    assert task.colorize(torch.tensor(2)).shape == (16, 48, 3)
