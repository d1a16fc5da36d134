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

from polytask.weighting.base import Reduce, Weighting, _identity, average_gradients, shared_parameters_of


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


Form = Literal["parameters", "representation"]


def gramian_weights(aggregator: aggregation.Aggregator, gramian: torch.Tensor) -> torch.Tensor:
    """The weights ``(T,)`` that ``aggregator`` gives the rows of a Jacobian whose Gramian
    ``J J^T`` is ``gramian`` ``(T, T)``.

    Gramian-weighted aggregators (UPGrad, DualProj, MGDA, PCGrad, CAGrad, IMTL-G, Aligned-MTL) take
    the Gramian itself; Nash-MTL and the mean read their matrix only through its Gramian, so they get
    a ``(T, T)`` factor ``F`` with ``F F^T = gramian``."""
    if isinstance(aggregator, aggregation.GramianWeightedAggregator):
        return aggregator.gramian_weighting(gramian)
    if isinstance(aggregator, aggregation.WeightedAggregator):
        values, vectors = torch.linalg.eigh(gramian)
        return aggregator.weighting(vectors * values.clamp_min(0).sqrt())
    raise ValueError(f"aggregator {type(aggregator).__name__} does not combine the task gradients with weights")


class GradientAggregation(Weighting):
    """Gradient aggregation through TorchJD (Jacobian descent): the shared parameters move along
    an aggregate of the task gradients instead of the gradient of a weighted sum.

    Aggregators: ``upgrad`` (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization",
    2024), ``dualproj``, ``mgda`` (Désidéri 2012; Sener & Koltun 2018), ``pcgrad`` (Yu et al. 2020),
    ``cagrad`` (Liu et al. 2021), ``imtl_g`` (Liu et al. 2021), ``aligned_mtl`` (Senushkin et
    al. 2023), ``nash_mtl`` (Navon et al. 2022) or ``mean``.

    Two forms:

    * ``parameters`` (the exact form, default): every step computes the Jacobian of the ``T`` task
      losses with respect to the network's shared parameters
      (:meth:`~polytask.models.base.MultiTaskNet.shared_parameters`; ``T`` backward passes through
      the shared part) with ``torchjd.autojac.backward``, and ``torchjd.autojac.jac_to_grad`` turns
      it into their gradient with the aggregator.
    * ``representation`` (the cheap form): the Jacobian ``J`` ``(T, N)`` of the task losses with
      respect to the one shared representation every head reads
      (:meth:`~polytask.models.base.MultiTaskNet.shared_representation_module`'s output, ``N``
      numbers per batch; ``T`` backward passes through the heads only), the aggregator's weights
      ``w`` from its Gramian ``J J^T``, and one backward pass of ``J^T w`` through the shared part.
      Only networks with such a representation offer it (hard sharing).

    The other trainable parameters (heads, task-specific layers, gates) get the gradient of the
    total as usual, and the shared ones also get the gradient of what the total holds besides the
    task losses (e.g. TaskExpert's load-balancing loss). The fixed loss weights are ignored; the
    logged total is ``sum_t L_t``, the logged weights are the aggregator's (where it has weights).

    Under DDP the module turns DDP's gradient averaging off and this strategy averages instead: the
    Jacobian of the shared parameters over the processes before aggregating (exact form; ``T`` times
    the communication of an ordinary step), or the ``T x T`` Gramian (representation form), then
    every other gradient. Every process then holds the gradients of one process with the whole
    batch (when each task loss is a mean over equal per-process batches). Float16 loss scaling is
    refused at the start of ``fit``; bf16 autocast works.

    Args:
        aggregator: the aggregator.
        options: its constructor's options (e.g. ``{c: 0.4}`` for CAGrad, the default here).
        parallel_chunk_size: exact form: task losses differentiated at once (TorchJD's option); 1
            (default): one backward pass per task, which works everywhere; ``None``: all at once
            through ``torch.vmap``, faster where it works (not with bf16 autocast on a CPU, nor
            compiled networks, nor ETR-NLP's float32 oneDNN mixes on a CPU: a failure inside
            ``torch.vmap`` is raised again naming this option).
        form: ``parameters`` or ``representation``, as above.
    """

    owns_backward = True

    def __init__(
        self,
        aggregator: AggregatorKind = "upgrad",
        options: dict[str, Any] | None = None,
        parallel_chunk_size: int | None = 1,
        form: Form = "parameters",
    ) -> None:
        super().__init__()
        if form not in ("parameters", "representation"):
            raise ValueError(f"GradientAggregation: form must be 'parameters' or 'representation', got {form!r}")
        self.kind = aggregator
        self.form = form
        self.parallel_chunk_size = parallel_chunk_size
        self.options = dict(options or {})
        self.aggregator = build_aggregator(aggregator, 2, self.options)  # fail early: unknown kind, missing extras
        self._shared: list[nn.Parameter] = []
        self._others: list[nn.Parameter] = []
        self._net_name = ""
        self._representation: torch.Tensor | None = None

    def setup(self, names: Sequence[str], loss_weights: Mapping[str, float]) -> None:
        super().setup(names, loss_weights)
        self.aggregator = build_aggregator(self.kind, self.num_tasks, self.options)

    def attach(self, net: nn.Module) -> None:
        self._shared = shared_parameters_of(net)
        ids = {id(p) for p in self._shared}
        self._others = [p for p in net.parameters() if p.requires_grad and id(p) not in ids]
        self._net_name = type(net).__name__
        if self.form == "representation":
            finder = getattr(net, "shared_representation_module", None)
            module = finder() if finder is not None else None
            if module is None:
                raise ValueError(
                    f"GradientAggregation(form='representation'): {self._net_name} has no single representation "
                    "that every task head reads (hard sharing has one); use form='parameters'"
                )
            module.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Forward hook on the shared representation's module: keep its output of a training step."""
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"GradientAggregation(form='representation'): {type(module).__name__} returned {type(output).__name__}, expected one tensor"
            )
        if self.training and output.requires_grad:
            self._representation = output

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:
        stacked = self._stack(losses)
        if not self.last_weights:
            self.last_weights = {n: 1.0 for n in self.names}
        return stacked.sum()

    def backward(self, total: torch.Tensor, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity, world_size: int = 1) -> None:
        if not self._shared:
            raise ValueError(
                f"GradientAggregation: {self._net_name or 'the network'} has no parameters shared by its tasks to aggregate on"
            )
        task_losses = [losses[n].float() for n in self.names]  # float32 roots: autocast leaves some losses in bf16
        if self.form == "parameters":
            weights = self._parameters_backward(task_losses, reduce, world_size)
        else:
            weights = self._representation_backward(task_losses, reduce, world_size)
        if weights is not None:
            self.last_weights = {n: w for n, w in zip(self.names, weights.detach().float().unbind())}
        rest = total - sum(task_losses)
        if rest.requires_grad:
            torch.autograd.backward(rest, inputs=self._shared, retain_graph=True)
        if self._others:
            torch.autograd.backward(total, inputs=self._others)
        if world_size > 1:
            average_gradients([*self._shared, *self._others], reduce)  # the aggregate is the same everywhere

    def _parameters_backward(self, task_losses: list[torch.Tensor], reduce: Reduce, world_size: int) -> torch.Tensor | None:
        """Exact form: aggregate the (process-averaged) Jacobian of the shared parameters into their ``.grad``."""
        try:
            jacobian_backward(task_losses, inputs=self._shared, retain_graph=True, parallel_chunk_size=self.parallel_chunk_size)
        except RuntimeError as err:
            if self.parallel_chunk_size == 1 or "vmap" not in str(err):
                raise
            raise RuntimeError(
                f"GradientAggregation: the vectorised backward (parallel_chunk_size={self.parallel_chunk_size}) of "
                f"{self._net_name or 'the network'} failed inside torch.vmap ({err}); set parallel_chunk_size: 1 "
                "(one backward pass per task), which works with every network"
            ) from err
        if world_size > 1:
            rows = len(task_losses)
            flat = reduce(torch.cat([p.jac.reshape(rows, -1) for p in self._shared], dim=1))
            for p, jac in zip(self._shared, flat.split([p.numel() for p in self._shared], dim=1)):
                p.jac = jac.reshape(rows, *p.shape)
        return jac_to_grad(self._shared, self.aggregator)

    def _representation_backward(self, task_losses: list[torch.Tensor], reduce: Reduce, world_size: int) -> torch.Tensor:
        """Representation form: weights from the Jacobian of the shared representation, one backward of ``J^T w``."""
        features, self._representation = self._representation, None
        if features is None:
            raise RuntimeError(
                f"GradientAggregation(form='representation'): {self._net_name}'s shared representation did not "
                "run with gradients in this training step"
            )
        dtype = torch.promote_types(features.dtype, torch.float32)
        rows = [torch.autograd.grad(loss, features, retain_graph=True)[0].reshape(-1).to(dtype) for loss in task_losses]
        jacobian = torch.stack(rows)
        # the whole batch's Jacobian holds every process's columns, each scaled by 1 / world_size
        gramian = reduce(jacobian @ jacobian.T) / world_size
        weights = gramian_weights(self.aggregator, gramian)
        direction = (weights.to(dtype) @ jacobian).view_as(features).to(features.dtype)
        torch.autograd.backward(features, grad_tensors=direction, inputs=self._shared, retain_graph=True)
        return weights

    def get_extra_state(self) -> torch.Tensor:
        """Nash-MTL's state as ``[step, *last weights]`` in float64 (TorchJD keeps it outside tensors),
        so that a resumed run continues it; an empty tensor for the other aggregators."""
        inner = getattr(self.aggregator, "weighting", None)
        if not hasattr(inner, "prvs_alpha"):
            return torch.zeros(0, dtype=torch.float64)
        return torch.tensor([float(inner.step), *np.asarray(inner.prvs_alpha, dtype=np.float64)], dtype=torch.float64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        inner = getattr(self.aggregator, "weighting", None)
        if not hasattr(inner, "prvs_alpha") or state.numel() == 0:
            return
        if state.numel() != self.num_tasks + 1:
            raise ValueError(
                f"GradientAggregation: the checkpoint's Nash-MTL state has {state.numel() - 1} weights, expected {self.num_tasks}"
            )
        inner.step = float(state[0])
        inner.prvs_alpha = state[1:].numpy().astype(np.float32)
        if inner.step > 0:
            inner._init_optim_problem()  # TorchJD builds its problem at step 0 only
