"""Loss weighting strategies: hand-computed values, distributed averaging with a fake reduce,
state round trips, training of hard sharing and TaskExpert, checkpoint resume, CLI selection."""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from conftest import HARD_SHARING_CONFIG, TINY_SEGNET, tiny_hard_sharing, tiny_synthscenes
from polytask.config import instantiate
from polytask.data.datasets.synthscenes import SynthScenesDataModule
from polytask.models import SingleTask
from polytask.models.etr_nlp import RoutedSegNet
from polytask.models.taskexpert import TaskExpert
from polytask.tasks import build_task
from polytask.training.checkpoint import AtomicCheckpointIO, check_plain
from polytask.training.module import MultiTaskModule
from polytask.training.per_task import PerTaskModule
from polytask.weighting import (
    FAMO,
    DynamicWeightAverage,
    EqualWeighting,
    FixedWeighting,
    GradientAggregation,
    GradNorm,
    LeastSquaresProjector,
    RandomLossWeighting,
    UncertaintyWeighting,
    Weighting,
    build_aggregator,
    last_layer_weight,
)
from polytask.weighting.aggregation import gramian_weights

TASKS = ("semseg", "depth", "sal")
NAMES = ["a", "b"]
NEEDS = {"cagrad": ("cvxpy",), "nash_mtl": ("cvxpy", "ecos")}
"""TorchJD's optional dependencies: cvxpy (with Clarabel) is in the test extras; ECOS (GPL-3.0), which
Nash-MTL needs, is not, so its cases run only where a user installed ``torchjd[nash_mtl]``."""


def _available(strategy: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in NEEDS.get(strategy, ()))


def losses(*values: float) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(v) for n, v in zip(NAMES, values)}


def ready(weighting: Weighting, loss_weights: dict[str, float] | None = None) -> Weighting:
    weighting.setup(NAMES, loss_weights or {})
    return weighting


def hard_net() -> functools.partial:
    return tiny_hard_sharing()


def taskexpert_net() -> functools.partial:
    backbone = {"img_size": (32, 48), "embed_dim": 32, "depth": 4, "num_heads": 2}
    return functools.partial(
        TaskExpert, backbone="vit_tiny_patch16_224", backbone_options=backbone, num_experts=3, width=16, head_channels=8
    )


def tiny_data(cache: Path) -> SynthScenesDataModule:
    """8 training images in batches of 4: two steps per epoch."""
    return tiny_synthscenes(TASKS, cache)


def module(
    data: SynthScenesDataModule, weighting: Weighting | None, net: functools.partial | None = None, **options: object
) -> MultiTaskModule:
    return MultiTaskModule(net=net or hard_net(), tasks=data.tasks, default_loss_weights=data.loss_weights, weighting=weighting, **options)


def trainer(root: Path, **options: object) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu",
        plugins=[AtomicCheckpointIO()], **options,
    )  # fmt: skip


# ---------------------------------------------------------------- values


def test_fixed_is_the_default_and_equals_the_old_weighted_sum_exactly(tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "cache")
    m = MultiTaskModule(net=hard_net(), tasks=data.tasks, default_loss_weights=data.loss_weights, loss_weights={"depth": 3.0})
    assert isinstance(m.weighting, FixedWeighting)
    assert not list(m.weighting.parameters()) and not list(m.weighting.buffers())
    assert not any(k.startswith("weighting") for k in m.state_dict())  # checkpoints are unchanged
    generator = torch.Generator().manual_seed(3)
    task_losses = {n: torch.rand((), generator=generator) * 5 for n in TASKS}
    expected = sum(m.loss_weights[n] * loss for n, loss in task_losses.items())  # the sum before strategies
    assert torch.equal(m.weighting(task_losses), expected)
    assert torch.equal(m.weighting(task_losses), m.weighted_total(task_losses))
    assert m.weighting.last_weights == m.loss_weights and m.loss_weights["depth"] == 3.0


def test_equal_weighting_ignores_the_fixed_weights() -> None:
    w = ready(EqualWeighting(), {"a": 5.0})
    assert float(w(losses(2.0, 3.0))) == 5.0
    assert w.last_weights == {"a": 1.0, "b": 1.0}


def test_uncertainty_total_and_gradient() -> None:
    w = ready(UncertaintyWeighting())
    assert torch.equal(w.log_variances.detach(), torch.zeros(2))
    with torch.no_grad():
        w.log_variances.copy_(torch.tensor([0.5, -1.0]))
    total = w(losses(2.0, 3.0))
    expected = math.exp(-0.5) * 2.0 + 0.5 + math.exp(1.0) * 3.0 - 1.0
    assert float(total) == pytest.approx(expected, rel=1e-6)
    total.backward()
    # d/ds_t [exp(-s_t) L_t + s_t] = 1 - exp(-s_t) L_t
    expected_grad = torch.tensor([1 - math.exp(-0.5) * 2.0, 1 - math.exp(1.0) * 3.0])
    torch.testing.assert_close(w.log_variances.grad, expected_grad)
    torch.testing.assert_close(torch.stack([w.last_weights["a"], w.last_weights["b"]]), torch.tensor([math.exp(-0.5), math.e]))
    # the optimum of s_t is log L_t
    with torch.no_grad():
        w.log_variances.copy_(torch.tensor([math.log(2.0), math.log(3.0)]))
    w.log_variances.grad = None
    w(losses(2.0, 3.0)).backward()
    torch.testing.assert_close(w.log_variances.grad, torch.zeros(2), atol=1e-6, rtol=0)


def run_epochs(w: DynamicWeightAverage, epochs: list[list[tuple[float, float]]], reduce=None) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """Feed per-step losses epoch by epoch; returns the weights used at every step."""
    used = []
    for epoch, steps in enumerate(epochs):
        for a, b in steps:
            w.set_epoch(epoch)
            w(losses(a, b))
            used.append(torch.stack([torch.as_tensor(w.last_weights[n]) for n in NAMES]))
            w.update(losses(a, b), *(() if reduce is None else (reduce,)))
    return used


def test_dwa_weights_by_hand_after_two_epochs() -> None:
    w = ready(DynamicWeightAverage(temperature=2.0), {"a": 7.0})
    epochs = [[(1.0, 2.0), (3.0, 4.0)], [(1.0, 3.0), (1.0, 3.0)], [(9.0, 9.0)]]  # means (2, 3) then (1, 3)
    used = run_epochs(w, epochs)
    for weights in used[:4]:  # equal weights during the first two epochs
        assert torch.equal(weights, torch.ones(2))
    # epoch 2: r = (1/2, 3/3); w_t = 2 exp(r_t / 2) / (exp(1/4) + exp(1/2))
    denominator = math.exp(0.25) + math.exp(0.5)
    expected = torch.tensor([2 * math.exp(0.25) / denominator, 2 * math.exp(0.5) / denominator])
    torch.testing.assert_close(used[4], expected, rtol=1e-6, atol=0)
    assert float(used[4].sum()) == pytest.approx(2.0)
    torch.testing.assert_close(w.history, torch.tensor([[2.0, 3.0], [1.0, 3.0]], dtype=torch.float64))
    assert int(w.finished_epochs) == 2 and int(w.epoch) == 2 and float(w.steps) == 1


def test_dwa_state_is_the_same_on_every_process_with_a_fake_reduce() -> None:
    """Two 'processes' average their losses through reduce: both hold the state (and weights) of
    one process seeing the mean losses, i.e. the whole batch."""
    rank_losses = [
        [[(1.0, 2.0), (3.0, 6.0)], [(2.0, 2.0), (1.0, 5.0)], [(1.0, 1.0)], [(1.0, 1.0)]],
        [[(3.0, 4.0), (1.0, 2.0)], [(0.0, 4.0), (1.0, 1.0)], [(3.0, 1.0)], [(1.0, 1.0)]],
    ]
    ranks = [ready(DynamicWeightAverage()) for _ in range(2)]
    single = ready(DynamicWeightAverage())
    used: list[list[torch.Tensor]] = [[], [], []]
    for epoch in range(4):
        for step in range(len(rank_losses[0][epoch])):
            values = [torch.tensor(rank_losses[r][epoch][step], dtype=torch.float64) for r in range(2)]
            mean = (values[0] + values[1]) / 2

            def reduce(tensor: torch.Tensor, rank: int = 0) -> torch.Tensor:
                assert torch.equal(tensor, values[rank])  # each process reduces its own losses
                return (values[0] + values[1]).to(tensor) / 2

            for r, w in enumerate(ranks):
                w.set_epoch(epoch)
                w(losses(*values[r].tolist()))
                used[r].append(torch.stack([w.last_weights[n] for n in NAMES]))
                w.update(losses(*values[r].tolist()), functools.partial(reduce, rank=r))
            single.set_epoch(epoch)
            single(losses(*mean.tolist()))
            used[2].append(torch.stack([single.last_weights[n] for n in NAMES]))
            single.update(losses(*mean.tolist()))
    for r in range(2):
        for key, value in single.state_dict().items():
            assert torch.equal(ranks[r].state_dict()[key], value), key
        assert all(torch.equal(a, b) for a, b in zip(used[r], used[2]))
    assert not torch.equal(used[2][-1], torch.ones(2))  # the last epoch really is weighted


def test_rlw_weights_sum_to_t_are_seeded_and_survive_a_state_round_trip() -> None:
    first, second, other = ready(RandomLossWeighting(seed=5)), ready(RandomLossWeighting(seed=5)), ready(RandomLossWeighting(seed=6))
    draws = [first.draw() for _ in range(3)]
    assert all(float(d.sum()) == pytest.approx(2.0) and bool((d > 0).all()) for d in draws)
    assert all(torch.equal(d, second.draw()) for d in draws)
    assert not torch.equal(draws[0], other.draw())
    state = first.state_dict()
    check_plain(state)
    restored = ready(RandomLossWeighting(seed=123))
    restored.load_state_dict(state)
    expected = [first.draw() for _ in range(2)]
    assert all(torch.equal(e, restored.draw()) for e in expected)
    total = restored(losses(2.0, 3.0))
    w = torch.stack([restored.last_weights[n] for n in NAMES])
    assert float(total) == pytest.approx(float(w[0] * 2.0 + w[1] * 3.0))


def test_famo_weights_are_its_softmax_over_the_losses_scaled_to_t() -> None:
    w = ready(FAMO(eps=0.0 + 1e-12))
    values = {n: torch.tensor(v, requires_grad=True) for n, v in zip(NAMES, (1.0, 3.0))}
    total = w(values)  # equal logits: w ~ 1 / L, normalised to sum to T = 2 -> (1.5, 0.5)
    total.backward()
    assert float(total) == pytest.approx(1.5 * 1.0 + 0.5 * 3.0)
    assert [float(values[n].grad) for n in NAMES] == pytest.approx([1.5, 0.5])
    assert [float(w.last_weights[n]) for n in NAMES] == pytest.approx([1.5, 0.5])


def test_famo_moves_weight_to_the_task_whose_loss_fell_less() -> None:
    w = ready(FAMO())
    w.update(losses(1.0, 1.0))
    assert torch.equal(w.logits, torch.zeros(2, dtype=torch.float64))  # nothing to compare with yet
    w.update(losses(0.5, 0.9))  # task a's log-loss fell more
    assert float(w.logits[0]) < float(w.logits[1])
    z = torch.tensor([0.5, 0.5], dtype=torch.float64)
    delta = torch.log(torch.tensor([1.0, 1.0], dtype=torch.float64)) - torch.log(torch.tensor([0.5, 0.9], dtype=torch.float64))
    expected = z * delta - z * (z @ delta)  # J^T delta of the softmax at equal logits
    torch.testing.assert_close(
        ready(FAMO()).logit_gradient(torch.ones(2, dtype=torch.float64), torch.tensor([0.5, 0.9], dtype=torch.float64)), expected
    )
    weights = w.weights(torch.ones(2))
    assert float(weights[1]) > 1.0 > float(weights[0]) and float(weights.sum()) == pytest.approx(2.0)


def test_famo_logit_steps_equal_torch_adam_with_weight_decay() -> None:
    famo = ready(FAMO(lr=0.05, weight_decay=0.01))
    logits = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=0.05, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        grad = torch.randn(2, generator=generator, dtype=torch.float64)
        famo._adam_step(grad.clone())
        logits.grad = grad.clone()
        adam.step()
        torch.testing.assert_close(famo.logits, logits.detach(), rtol=1e-12, atol=1e-14)


class TwoHeads(nn.Module):
    """A shared linear layer ``W`` (2 -> 2) and two scalar heads: the smallest network with shared parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(2, 2, bias=False)
        self.heads = nn.ModuleList([nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.shared.weight]

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.shared(x)
        return {n: head(h).pow(2).mean() for n, head in zip(NAMES, self.heads)}


def test_gradnorm_total_and_weight_gradient_follow_the_paper_by_hand() -> None:
    torch.manual_seed(0)
    net, x = TwoHeads(), torch.randn(4, 2)
    w = ready(GradNorm(alpha=1.5))
    w.attach(net)
    first = net.losses(x)  # the first step records L(0) = these losses: every r_t = 1
    total = w(first)
    norms = torch.stack([torch.autograd.grad(first[n], net.shared.weight, retain_graph=True)[0].norm() for n in NAMES])
    assert float(total) == pytest.approx(float(first["a"] + first["b"]))
    total.backward()
    target = norms.mean()  # w = (1, 1), r = (1, 1): target = mean_t G_t
    torch.testing.assert_close(w.task_weights.grad, torch.sign(norms - target) * norms)
    # the network's gradient is that of sum_t w_t L_t with the weights held constant
    expected = torch.autograd.grad(sum(net.losses(x).values()), net.heads[0].weight)[0]
    torch.testing.assert_close(net.heads[0].weight.grad, expected)

    with torch.no_grad():
        w.task_weights.copy_(torch.tensor([2.0, 4.0]))
    w(net.losses(x))  # renormalised to sum to T = 2 before use
    torch.testing.assert_close(w.task_weights.detach(), torch.tensor([2.0, 4.0]) * 2 / 6)
    assert [float(v) for v in w.last_weights.values()] == pytest.approx([2 / 3, 4 / 3])


def test_gradnorm_normalises_on_the_last_shared_layer_weight() -> None:
    tasks = [build_task("semseg", num_classes=3), build_task("depth")]
    hard = tiny_hard_sharing()(tasks)
    assert last_layer_weight(hard, hard.shared_parameters()) == [hard.decoder.fuse[0].weight]  # not the BN after it
    expert = taskexpert_net()(tasks)
    assert last_layer_weight(expert, expert.shared_parameters()) == [expert.mmoe[-1].experts.weight]  # not a norm gain
    w = ready(GradNorm(parameters="all"), {})
    w.attach(hard)
    assert len(w._shared) == len(hard.shared_parameters())


def test_gradnorm_without_shared_parameters_says_so() -> None:
    w = ready(GradNorm())
    w.attach(SingleTask([build_task("depth")], backbone="test_resnet", decoder_channels=8, head_channels=4))
    with pytest.raises(ValueError, match="SingleTask has no parameters shared by its tasks"):
        w(losses(1.0, 2.0))


def test_least_squares_projector_solves_torchjds_dual_cone_problem() -> None:
    from scipy.optimize import minimize

    generator = torch.Generator().manual_seed(0)
    for m in (2, 3, 5):
        j = torch.randn(m, 7, generator=generator, dtype=torch.float64)
        gram = j @ j.T
        u = torch.rand(m, generator=generator, dtype=torch.float64)
        got = LeastSquaresProjector(reg_eps=0.0)(u, gram).numpy()
        g = gram.numpy()
        generic = minimize(
            lambda v: v @ g @ v,
            u.numpy() + 1,
            jac=lambda v: 2 * g @ v,
            constraints=[{"type": "ineq", "fun": lambda v: v - u.numpy()}],
            method="SLSQP",
            options={"ftol": 1e-14},
        )
        assert generic.success
        assert got @ g @ got == pytest.approx(generic.fun, rel=1e-6, abs=1e-10) and (got >= u.numpy() - 1e-9).all()


def test_upgrad_with_our_projector_projects_each_row_onto_the_dual_cone_by_hand() -> None:
    # rows (1, 0) and (-1, 1) conflict: their projections onto {x2 >= x1 >= 0} are (0.5, 0.5) and (0, 1)
    aggregate = build_aggregator("upgrad", 2)(torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(aggregate, torch.tensor([0.25, 0.75], dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(
        build_aggregator("upgrad", 2)(torch.eye(2, dtype=torch.float64)), torch.full((2,), 0.5, dtype=torch.float64), rtol=0, atol=1e-3
    )
    with pytest.raises(ValueError, match="unknown aggregator"):
        build_aggregator("sum_of_squares", 2)


class SharedVector(nn.Module):
    """A shared vector ``s`` (2,) and one scalar head per task: ``L_a = a0 * s.(1, 0)``, ``L_b = b0 * s.(-1, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor([0.3, -0.2]))
        self.a = nn.Parameter(torch.tensor(2.0))
        self.b = nn.Parameter(torch.tensor(3.0))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.s]

    def losses(self) -> dict[str, torch.Tensor]:
        return {"a": self.a * (self.s @ torch.tensor([1.0, 0.0])), "b": self.b * (self.s @ torch.tensor([-1.0, 1.0]))}


def test_aggregation_moves_shared_parameters_by_the_aggregate_and_heads_by_their_own_gradient() -> None:
    net = SharedVector()
    w = ready(GradientAggregation("pcgrad"))
    w.attach(net)
    task_losses = net.losses()
    total = w(task_losses) + 0.5 * net.s.sum()  # an extra term (like an auxiliary loss) on the shared vector
    w.backward(total, task_losses)
    jacobian = torch.tensor([[2.0, 0.0], [-3.0, 3.0]])  # rows: grad_s L_a, grad_s L_b
    expected = build_aggregator("pcgrad", 2)(jacobian) + 0.5
    torch.testing.assert_close(net.s.grad, expected)
    assert not torch.allclose(net.s.grad, jacobian.sum(0) + 0.5)  # not the plain sum: the tasks conflict
    torch.testing.assert_close(net.a.grad, torch.tensor(0.3))  # dL_a/da = s.(1, 0)
    torch.testing.assert_close(net.b.grad, torch.tensor(-0.5))  # dL_b/db = s.(-1, 1)


class SharedFeatures(nn.Module):
    """A shared linear encoder (its output ``z`` (5, 4) read by both heads) and one linear head per
    task; head ``b`` points against head ``a``, so the two task gradients on ``z`` conflict."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(5, 3, generator=generator)
        self.encoder = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))
            self.heads["b"].weight.copy_(-self.heads["a"].weight)

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def shared_representation_module(self) -> nn.Module:
        return self.encoder

    def head_losses(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": self.heads["a"](z).mean(), "b": self.heads["b"](z).mean() + 0.1 * z.pow(2).mean()}

    def losses(self) -> dict[str, torch.Tensor]:
        return self.head_losses(self.encoder(self.x))


@pytest.mark.parametrize("aggregator", ["upgrad", "mgda", "mean"])
def test_representation_form_moves_the_encoder_by_the_aggregate_of_the_representations_jacobian(aggregator: str) -> None:
    """By hand: TorchJD's aggregator applied to the Jacobian ``J`` of the losses on ``z`` gives the
    direction on ``z``; the encoder's gradient is its vector-Jacobian product; each head gets its own
    task's gradient."""
    net = SharedFeatures()
    w = ready(GradientAggregation(aggregator, form="representation"))
    w.attach(net)
    task_losses = net.losses()
    w.backward(w(task_losses), task_losses)
    got = [p.grad.clone() for p in net.parameters()]

    net.zero_grad()
    z = net.encoder(net.x)
    task_losses = net.head_losses(z)
    jacobian = torch.stack([torch.autograd.grad(task_losses[n], z, retain_graph=True)[0].reshape(-1) for n in NAMES])
    assert float(jacobian[0] @ jacobian[1]) < 0  # the tasks conflict on z
    direction = build_aggregator(aggregator, 2)(jacobian).view_as(z)
    if aggregator != "mean":
        assert not torch.allclose(direction, jacobian.mean(0).view_as(z))  # not the plain average
    expected_encoder = torch.autograd.grad(z, list(net.encoder.parameters()), grad_outputs=direction, retain_graph=True)
    expected_heads = [torch.autograd.grad(task_losses[n], list(net.heads[n].parameters()), retain_graph=True) for n in NAMES]
    for value, expected in zip(got, [*expected_encoder, *expected_heads[0], *expected_heads[1]]):
        torch.testing.assert_close(value, expected)


def test_representation_form_weights_from_the_gramian_equal_the_aggregators_own() -> None:
    """Under DDP the representation form sees only the summed Gramian ``J J^T``: the weights it gets
    from it equal those the aggregator computes from ``J`` itself (Nash-MTL and the mean get a factor
    of the Gramian)."""
    jacobian = torch.tensor([[1.0, 0.5, -2.0, 0.3], [-1.5, 0.2, 1.0, 0.0], [0.4, -0.7, 0.1, 2.0]], dtype=torch.float64)
    kinds = ["upgrad", "dualproj", "mgda", "pcgrad", "imtl_g", "aligned_mtl", "mean"]
    kinds += [k for k in ("cagrad", "nash_mtl") if _available(k)]
    for kind in kinds:
        torch.manual_seed(0)  # PCGrad projects in a random order
        expected = build_aggregator(kind, 3).weighting(jacobian)
        torch.manual_seed(0)
        got = gramian_weights(build_aggregator(kind, 3), jacobian @ jacobian.T)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=kind)


def test_representation_form_trains_a_routed_network_whose_trunk_is_shared(tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "cache")
    net = functools.partial(RoutedSegNet, routing="hard_sharing", **TINY_SEGNET)
    m = module(data, GradientAggregation("upgrad", form="representation"), net)
    start = [p.detach().clone() for p in m.net.shared_parameters()]
    trainer(tmp_path, max_steps=2).fit(m, datamodule=data)
    assert all(not torch.equal(a, p.detach()) for a, p in zip(start, m.net.shared_parameters()) if p.ndim > 1)
    assert m.weighting._representation is None  # released after every step


def test_vectorised_exact_form_gives_the_per_task_backwards_gradients(tmp_path: Path) -> None:
    """``parallel_chunk_size=None`` (one ``torch.vmap`` pass) gives what one backward per task gives."""
    data = tiny_data(tmp_path / "cache")
    trained, start = [], None
    for chunk in (1, None):
        pl.seed_everything(0)
        m = module(data, GradientAggregation("upgrad", parallel_chunk_size=chunk))
        start = [p.detach().clone() for p in m.net.shared_parameters()]
        trainer(tmp_path, max_steps=1).fit(m, datamodule=data)
        trained.append([p.detach().clone() for p in m.net.shared_parameters()])
    assert start is not None and any(not torch.equal(a, b) for a, b in zip(start, trained[0]))
    for a, b in zip(*trained, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="ETR-NLP's channels-last path needs oneDNN")
def test_a_failed_vectorised_backward_names_the_option_that_works(tmp_path: Path) -> None:
    """ETR-NLP in float32 on a CPU runs oneDNN convolutions that ``torch.vmap`` cannot batch: the
    vectorised exact form stops with an error that names the network and ``parallel_chunk_size: 1``."""
    pl.seed_everything(0)
    data = tiny_data(tmp_path / "cache")
    net = functools.partial(RoutedSegNet, routing="etr_nlp", **TINY_SEGNET)
    m = module(data, GradientAggregation("upgrad", parallel_chunk_size=None), net)
    with pytest.raises(RuntimeError, match=r"RoutedSegNet failed inside torch.vmap .*set parallel_chunk_size: 1"):
        trainer(tmp_path, max_steps=1).fit(m, datamodule=data)


@pytest.mark.skipif(not _available("nash_mtl"), reason="needs torchjd[nash_mtl] (cvxpy, ecos)")
def test_nash_mtl_state_survives_a_checkpoint_round_trip() -> None:
    """Nash-MTL recomputes its weights every second step here, reusing its last ones in between: a
    restored copy continues the schedule and the weights; a fresh one would not."""
    jacobians = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def make() -> GradientAggregation:
        strategy = GradientAggregation("nash_mtl", options={"update_weights_every": 2})
        strategy.setup(list(TASKS), {})
        return strategy

    trained = make()
    for jacobian in jacobians[:3]:
        trained.aggregator(jacobian)
    restored = make()
    restored.load_state_dict(trained.state_dict())
    assert float(trained.state_dict()["_extra_state"][0]) == 3.0
    expected = trained.aggregator(jacobians[3])  # step 3: the weights of step 2
    torch.testing.assert_close(restored.aggregator(jacobians[3]), expected)
    assert not torch.allclose(make().aggregator(jacobians[3]), expected)


# ---------------------------------------------------------------- training

STRATEGIES = {
    "fixed": lambda: None,
    "equal": EqualWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "rlw": lambda: RandomLossWeighting(seed=1),
    "famo": FAMO,
    "gradnorm": GradNorm,
    "upgrad": lambda: GradientAggregation("upgrad"),
    "pcgrad": lambda: GradientAggregation("pcgrad"),
    "upgrad_representation": lambda: GradientAggregation("upgrad", form="representation"),
    "cagrad": lambda: GradientAggregation("cagrad"),
    "nash_mtl": lambda: GradientAggregation("nash_mtl"),
}
AGGREGATION = ("upgrad", "pcgrad", "upgrad_representation", "cagrad", "nash_mtl")


def strategy_params() -> list:
    return [pytest.param(s, marks=pytest.mark.skipif(not _available(s), reason=f"needs {NEEDS.get(s)}")) for s in STRATEGIES]


NETS = {
    "hard_sharing": hard_net,
    "taskexpert": taskexpert_net,
    "etr_nlp": lambda: functools.partial(RoutedSegNet, routing="etr_nlp", **TINY_SEGNET),
    "task_routing": lambda: functools.partial(RoutedSegNet, routing="task_routing", **TINY_SEGNET),
    "single_task": lambda: functools.partial(SingleTask, backbone="test_resnet", decoder_channels=8, head_channels=4),
}
"""Every architecture family: the two papers' models and the baselines (hard sharing, Task Routing, single-task)."""

TRAINING_SETTINGS = {
    "fp32": {},
    "bf16_clipped": {"precision": "bf16-mixed", "gradient_clip_val": 0.5},  # bf16 autocast and clipping, hard sharing only
}


@pytest.mark.parametrize(("net", "setting"), [*((n, "fp32") for n in NETS), ("hard_sharing", "bf16_clipped")])
@pytest.mark.parametrize("strategy", strategy_params())
def test_every_strategy_trains_every_architecture(strategy: str, net: str, setting: str, tmp_path: Path) -> None:
    pl.seed_everything(0)
    data = tiny_data(tmp_path / "cache")
    if strategy == "upgrad_representation" and net != "hard_sharing":  # one representation read by every head
        with pytest.raises(ValueError, match="has no single representation that every task head reads"):
            module(data, STRATEGIES[strategy](), NETS[net]())
        return
    m = module(data, STRATEGIES[strategy](), NETS[net]())
    start = [p.detach().clone() for p in m.weighting.parameters()]
    t = trainer(tmp_path, max_steps=5, **TRAINING_SETTINGS[setting])  # 3 epochs: DWA weights its third
    if strategy in ("gradnorm", *AGGREGATION) and net == "single_task":
        with pytest.raises(ValueError, match="no parameters shared by its tasks"):
            t.fit(m, datamodule=data)
        return
    t.fit(m, datamodule=data)
    assert t.global_step == 5
    logged = t.logged_metrics
    assert math.isfinite(float(logged["train/loss"]))
    weights = torch.stack([torch.as_tensor(logged[f"train/weight/{n}"]) for n in TASKS]).float()
    assert bool(torch.isfinite(weights).all())
    if strategy == "fixed":
        assert weights.tolist() == [m.loss_weights[n] for n in TASKS]
    if strategy in ("dwa", "rlw", "famo", "gradnorm"):
        assert float(weights.sum()) == pytest.approx(3.0, rel=1e-5)
    if strategy == "famo":  # its logits moved after the first step
        assert int(m.weighting.adam_steps) == 4 and float(m.weighting.logits.abs().sum()) > 0
    if strategy == "dwa":
        assert int(m.weighting.finished_epochs) == 2 and not torch.allclose(weights, torch.ones(3))
    if strategy == "uncertainty":  # its log-variances reached the optimizer
        assert not torch.equal(start[0], m.weighting.log_variances.detach())
    if strategy == "gradnorm":  # its weights were trained by L_grad
        assert not torch.equal(start[0], m.weighting.task_weights.detach()) and bool(m.weighting.has_initial)


@pytest.mark.parametrize("strategy", ["famo", "gradnorm", "upgrad"])
def test_per_task_training_refuses_a_strategy_that_needs_every_loss_of_a_step(strategy: str, tmp_path: Path) -> None:
    data = tiny_data(tmp_path / "cache")
    m = PerTaskModule(net=hard_net(), tasks=data.tasks, weighting=STRATEGIES[strategy]())
    with pytest.raises(ValueError, match="trains one task per optimizer step, and weighting .* needs every task's loss"):
        trainer(tmp_path, max_steps=1).fit(m, datamodule=data)


@pytest.mark.parametrize("strategy", ["fixed", "equal", "uncertainty", "dwa", "rlw"])
def test_per_task_training_weights_each_task_step(strategy: str, tmp_path: Path) -> None:
    """ETR-NLP trained one task per optimizer step: each task's step back-propagates its own term
    with the weights the strategy gave the batch before its losses (DWA's from the epochs before,
    RLW's draw, uncertainty's ``exp(-s_t) L_t + s_t``), and the strategy sees the batch's losses."""
    pl.seed_everything(0)
    data = tiny_data(tmp_path / "cache")
    net = functools.partial(RoutedSegNet, routing="etr_nlp", **TINY_SEGNET)
    m = PerTaskModule(net=net, tasks=data.tasks, default_loss_weights=data.loss_weights, weighting=STRATEGIES[strategy]())
    start = [p.detach().clone() for p in m.weighting.parameters()]
    t = trainer(tmp_path, max_epochs=3)  # 2 batches per epoch: DWA weights its third
    t.fit(m, datamodule=data)
    assert t.global_step == 3 * 2 * len(TASKS)  # one optimizer step per task and batch
    weights = torch.stack([torch.as_tensor(t.logged_metrics[f"train/weight/{n}"]) for n in TASKS]).float()
    if strategy == "fixed":
        assert weights.tolist() == [m.loss_weights[n] for n in TASKS]
    if strategy == "equal":
        assert weights.tolist() == [1.0, 1.0, 1.0]
    if strategy in ("dwa", "rlw"):
        assert float(weights.sum()) == pytest.approx(3.0, rel=1e-5) and not torch.allclose(weights, torch.ones(3))
    if strategy == "dwa":  # it saw the losses of two finished epochs
        assert int(m.weighting.finished_epochs) == 2
    if strategy == "uncertainty":  # every task's step trained its own log-variance
        moved = (m.weighting.log_variances.detach() - start[0]).abs()
        assert bool((moved > 0).all())
        torch.testing.assert_close(weights, torch.exp(-m.weighting.log_variances.detach()), rtol=0.05, atol=0.0)


def test_a_skipped_non_finite_step_leaves_no_trace_in_the_strategys_state(tmp_path: Path) -> None:
    """A NaN loss in the second step: the non-finite guard skips it and restores the module's
    buffers, DWA's loss sums and step count included, so DWA's epoch means hold the finite steps only."""
    pl.seed_everything(0)
    data = tiny_data(tmp_path / "cache")
    m = module(data, DynamicWeightAverage())
    compute = m.compute_losses
    seen: list[dict[str, float]] = []

    def losses_with_a_nan(outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        result = compute(outputs, batch)
        if len(seen) == 1:
            result["depth"] = result["depth"] * float("nan")
        seen.append({n: float(v) for n, v in result.items()})
        return result

    m.compute_losses = losses_with_a_nan  # type: ignore[method-assign]
    trainer(tmp_path, max_epochs=2).fit(m, datamodule=data)  # epoch 0: a finite step, then the NaN step
    assert m.guard.total == 1 and math.isnan(seen[1]["depth"])
    assert int(m.weighting.finished_epochs) == 1
    expected = torch.tensor([seen[0][n] for n in TASKS], dtype=m.weighting.history.dtype)  # epoch 0's mean: step 0 alone
    torch.testing.assert_close(m.weighting.history[1], expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("strategy", ["dwa", "rlw", "famo"])
def test_checkpoint_round_trip_restores_the_strategy_state(strategy: str, tmp_path: Path) -> None:
    """Train 4 steps (2 epochs), save a Lightning checkpoint, load it into a fresh module: the
    strategy's state is restored, and the next weights equal those of the uninterrupted module."""
    data = tiny_data(tmp_path / "cache")
    pl.seed_everything(0)
    trained = module(data, STRATEGIES[strategy]())
    t = trainer(tmp_path, max_steps=4)
    t.fit(trained, datamodule=data)
    path = tmp_path / "stop.ckpt"
    t.save_checkpoint(path)  # AtomicCheckpointIO checks it holds only tensors and plain values
    saved = torch.load(path, weights_only=True)
    keys = sorted(k for k in saved["state_dict"] if k.startswith("weighting."))
    assert keys == {
        "dwa": ["weighting.epoch", "weighting.finished_epochs", "weighting.history", "weighting.loss_sum", "weighting.steps"],
        "rlw": ["weighting._extra_state"],
        "famo": [
            "weighting.adam_steps", "weighting.exp_avg", "weighting.exp_avg_sq", "weighting.has_previous", "weighting.logits",
            "weighting.previous",
        ],
    }[strategy]  # fmt: skip

    pl.seed_everything(123)
    restored = module(data, RandomLossWeighting(seed=99) if strategy == "rlw" else STRATEGIES[strategy]())
    restored.load_state_dict(saved["state_dict"])
    for key, value in trained.weighting.state_dict().items():
        assert torch.equal(restored.weighting.state_dict()[key], value), key
    if strategy == "dwa":
        assert int(restored.weighting.finished_epochs) >= 1 and float(restored.weighting.history.abs().sum()) > 0
    generator = torch.Generator().manual_seed(0)
    for epoch in (2, 3, 4):  # a few more epochs of the same losses on both
        for _ in range(2):
            task_losses = {n: torch.rand((), generator=generator) + 0.5 for n in TASKS}
            used = []
            for m in (trained, restored):
                m.weighting.set_epoch(epoch)
                m.weighting(task_losses)
                used.append([float(m.weighting.last_weights[n]) for n in TASKS])
                m.weighting.update(task_losses)
            assert used[0] == used[1]
    assert used[0] != [1.0, 1.0, 1.0]


def test_cli_selects_a_strategy_and_its_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POLYTASK_CACHE", str(tmp_path / "cache"))
    tiny = ["--config", HARD_SHARING_CONFIG, "--data.num_train", "8", "--data.num_val", "4", "--data.image_size", "[32, 48]",
            "--model.net.init_args.decoder_channels", "8", "--model.net.init_args.head_channels", "4"]  # fmt: skip
    cli = instantiate(overrides=[*tiny, "--model.init_args.weighting", "polytask.weighting.DynamicWeightAverage",
                                 "--model.init_args.weighting.init_args.temperature", "3"])  # fmt: skip
    assert isinstance(cli.model.weighting, DynamicWeightAverage) and cli.model.weighting.temperature == 3.0
    assert cli.model.weighting.names == [t.name for t in cli.model.tasks]
    assert isinstance(instantiate(overrides=tiny).model.weighting, FixedWeighting)
