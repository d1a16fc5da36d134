"""Gradient aggregation through TorchJD (Jacobian descent): the shared parameters move along an
aggregate of the task gradients instead of the gradient of a weighted sum."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import lsq_linear
from torch import nn
from torchjd import aggregation
from torchjd.autojac import backward as jacobian_backward
from torchjd.autojac import jac_to_grad
from torchjd.linalg import DualConeProjector

from polytask.weighting.base import Reduce, Weighting, _identity, shared_parameters_of


class LeastSquaresProjector(DualConeProjector):
    """Projection weights onto the dual cone of a Jacobian's rows, for TorchJD's UPGrad and DualProj,
    solved with SciPy instead of the GPL-licensed quadprog that TorchJD's default projector needs.

    For every ``u`` it solves ``min_v v^T G v`` subject to ``v >= u`` (TorchJD's formulation) as the
    bounded least-squares problem ``min_v |A v|^2, v >= u`` with ``A^T A = G`` (from the
    eigendecomposition of ``G``), by :func:`scipy.optimize.lsq_linear`. ``G`` is scaled by its mean
    diagonal and ``reg_eps`` is added to its diagonal first, so that a Gramian that rounding made
    slightly indefinite still has a unique solution.

    Args:
        reg_eps: added to the diagonal of the scaled Gramian.
    """

    def __init__(self, reg_eps: float = 1e-4) -> None:
        self.reg_eps = float(reg_eps)

    def __call__(self, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Weights ``(..., m)`` for the vectors ``U`` ``(..., m)`` and the Gramian ``G`` ``(m, m)``."""
        gram = G.detach().double().cpu()
        scale = gram.diagonal().mean().clamp_min(1e-12)
        gram = gram / scale + self.reg_eps * torch.eye(gram.shape[0], dtype=torch.float64)
        values, vectors = torch.linalg.eigh(gram)
        a = (values.clamp_min(0).sqrt()[:, None] * vectors.T).numpy()
        zeros = np.zeros(a.shape[0])
        flat = U.detach().double().cpu().reshape(-1, gram.shape[0]).numpy()
        weights = [lsq_linear(a, zeros, bounds=(u, np.inf), method="bvls").x for u in flat]
        return torch.as_tensor(np.array(weights), dtype=G.dtype, device=G.device).reshape(U.shape)


AggregatorKind = Literal["upgrad", "dualproj", "mgda", "pcgrad", "cagrad", "imtl_g", "aligned_mtl", "nash_mtl", "mean"]


def build_aggregator(kind: AggregatorKind, num_tasks: int, options: Mapping[str, Any] | None = None) -> Any:
    """The TorchJD aggregator ``kind`` with ``options`` (UPGrad and DualProj get :class:`LeastSquaresProjector`
    unless ``options`` names a ``projector``; CAGrad and Nash-MTL need TorchJD's optional extras)."""
    options = dict(options or {})
    classes = {
        "upgrad": aggregation.UPGrad, "dualproj": aggregation.DualProj, "mgda": aggregation.MGDA,
        "pcgrad": aggregation.PCGrad, "cagrad": aggregation.CAGrad, "imtl_g": aggregation.IMTLG,
        "aligned_mtl": aggregation.AlignedMTL, "nash_mtl": aggregation.NashMTL, "mean": aggregation.Mean,
    }  # fmt: skip
    if kind not in classes:
        raise ValueError(f"unknown aggregator {kind!r}; choose one of {sorted(classes)}")
    if kind in ("upgrad", "dualproj"):
        options.setdefault("projector", LeastSquaresProjector())
    if kind == "cagrad":
        options.setdefault("c", 0.4)
    if kind == "nash_mtl":
        options.setdefault("n_tasks", num_tasks)
    try:
        return classes[kind](**options)
    except ImportError as err:
        extra = {"cagrad": "cagrad", "nash_mtl": "nash_mtl"}.get(kind, "")
        raise ImportError(f"aggregator {kind!r} needs TorchJD's optional dependencies: pip install 'torchjd[{extra}]' ({err})") from err


class GradientAggregation(Weighting):
    """Gradient aggregation through TorchJD (Jacobian descent): the shared parameters move along
    an aggregate of the task gradients instead of the gradient of a weighted sum.

    Every step computes the Jacobian of the task losses with respect to the network's shared
    parameters (:meth:`~polytask.models.base.MultiTaskNet.shared_parameters`: one row per task, the
    exact form, ``T`` backward passes through the shared part) with ``torchjd.autojac.backward``,
    and ``torchjd.autojac.jac_to_grad`` turns it into their gradient with the chosen aggregator:
    ``upgrad`` (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024),
    ``dualproj``, ``mgda`` (Désidéri 2012; Sener & Koltun 2018), ``pcgrad`` (Yu et al. 2020),
    ``cagrad`` (Liu et al. 2021), ``imtl_g`` (Liu et al. 2021), ``aligned_mtl`` (Senushkin et
    al. 2023), ``nash_mtl`` (Navon et al. 2022) or ``mean``. The other trainable parameters (heads,
    task-specific layers, gates) get the gradient of the total as usual, and the shared ones also
    get the gradient of what the total holds besides the task losses (e.g. TaskExpert's
    load-balancing loss). The fixed loss weights are ignored; the logged total is ``sum_t L_t``.

    Limits (checked at the start of ``fit``): one process (under DDP the gradients computed here
    would bypass DDP's averaging), and no float16 loss scaling (bf16 autocast is fine).

    Args:
        aggregator: the aggregator.
        options: its constructor's options (e.g. ``{c: 0.4}`` for CAGrad, the default here).
        parallel_chunk_size: task losses differentiated at once (TorchJD's option); 1 (default):
            one backward pass per task, which works everywhere; ``None``: all at once through
            ``torch.vmap``, faster where it works (not with bf16 autocast on a CPU, nor compiled networks).
    """

    owns_backward = True

    def __init__(
        self, aggregator: AggregatorKind = "upgrad", options: dict[str, Any] | None = None, parallel_chunk_size: int | None = 1
    ) -> None:
        super().__init__()
        self.kind = aggregator
        self.parallel_chunk_size = parallel_chunk_size
        self.options = dict(options or {})
        self.aggregator = build_aggregator(aggregator, 2, self.options)  # fail early: unknown kind, missing extras
        self._shared: list[nn.Parameter] = []
        self._others: list[nn.Parameter] = []
        self._net_name = ""

    def setup(self, names: Sequence[str], loss_weights: Mapping[str, float]) -> None:
        super().setup(names, loss_weights)
        self.aggregator = build_aggregator(self.kind, self.num_tasks, self.options)

    def attach(self, net: nn.Module) -> None:
        self._shared = shared_parameters_of(net)
        ids = {id(p) for p in self._shared}
        self._others = [p for p in net.parameters() if p.requires_grad and id(p) not in ids]
        self._net_name = type(net).__name__

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:
        stacked = self._stack(losses)
        if not self.last_weights:
            self.last_weights = {n: 1.0 for n in self.names}
        return stacked.sum()

    def backward(self, total: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> None:
        if not self._shared:
            raise ValueError(
                f"GradientAggregation: {self._net_name or 'the network'} has no parameters shared by its tasks to aggregate on"
            )
        task_losses = [losses[n].float() for n in self.names]  # float32 roots: autocast leaves some losses in bf16
        jacobian_backward(task_losses, inputs=self._shared, retain_graph=True, parallel_chunk_size=self.parallel_chunk_size)
        weights = jac_to_grad(self._shared, self.aggregator)
        if weights is not None:
            self.last_weights = {n: w for n, w in zip(self.names, weights.detach().float().unbind())}
        rest = total - sum(task_losses)
        if rest.requires_grad:
            torch.autograd.backward(rest, inputs=self._shared, retain_graph=True)
        if self._others:
            torch.autograd.backward(total, inputs=self._others)
