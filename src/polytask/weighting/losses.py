"""Loss-based strategies: the total is a weighted sum of the task losses, with weights that are
fixed, learnt (uncertainty, GradNorm) or computed from the losses (DWA, RLW, FAMO)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from polytask.weighting.base import Reduce, Weighting, _identity, gradient_matrix, shared_parameters_of


class FixedWeighting(Weighting):
    """Fixed weights: ``sum_t w_t L_t`` with ``w_t`` the dataset's default loss weights merged with
    the module's ``loss_weights`` (the default strategy; the weighting of the papers polytask
    reproduces, e.g. TaskExpert (Ye & Xu, ICCV 2023) and InvPT's loss weights).

    The sum is computed exactly as :meth:`MultiTaskModule.weighted_total` does (same order, Python
    float weights), so results are bit-identical to polytask before strategies existed. No state.
    """

    per_task_steps = True

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:
        self.last_weights = {n: self.loss_weights[n] for n in losses}
        return sum(self.loss_weights[n] * loss for n, loss in losses.items())

    def per_task_weights(self) -> dict[str, torch.Tensor | float]:
        self.last_weights = dict(self.loss_weights)
        return self.last_weights


class EqualWeighting(Weighting):
    """Equal weights: ``sum_t L_t`` (every weight 1; the fixed loss weights are ignored).

    The "EW" baseline of LibMTL (Lin & Zhang, "LibMTL: A Python Library for Multi-Task
    Learning", JMLR 2023). No state.
    """

    per_task_steps = True

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:
        self.last_weights = {n: 1.0 for n in losses}
        return sum(loss for loss in losses.values())

    def per_task_weights(self) -> dict[str, torch.Tensor | float]:
        self.last_weights = {n: 1.0 for n in self.names}
        return self.last_weights


class UncertaintyWeighting(Weighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    One learnable log-variance ``s_t = log sigma_t^2`` per task (``T`` parameters, trained by the
    module's optimizer with the network) and

        ``total = sum_t exp(-s_t) L_t + s_t``

    for every task, regression and classification alike; the logged weight of task ``t`` is
    ``exp(-s_t)``. The paper's regression form is ``L_t / (2 sigma_t^2) + log sigma_t`` (half of
    the above) and its classification form ``L_t / sigma_t^2 + log sigma_t`` (``exp(-s_t) L_t +
    s_t / 2``). Dropping the 1/2 factors and using one form for every task is our assumption (a
    common simplification); it keeps the optimum ``s_t = log L_t`` for every task. The fixed loss
    weights are ignored.

    Args:
        init_log_variance: initial ``s_t`` of every task (0: every weight starts at 1).
    """

    per_task_steps = True

    def __init__(self, init_log_variance: float = 0.0) -> None:
        super().__init__()
        self.init_log_variance = float(init_log_variance)
        self.log_variances = nn.Parameter(torch.zeros(0))

    def setup(self, names: Sequence[str], loss_weights: Mapping[str, float]) -> None:
        super().setup(names, loss_weights)
        self.log_variances = nn.Parameter(torch.full((self.num_tasks,), self.init_log_variance))

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:
        s = self.log_variances
        stacked = self._stack(losses)
        self.last_weights = {n: w for n, w in zip(self.names, torch.exp(-s).detach().unbind())}
        return (torch.exp(-s) * stacked + s).sum()

    def per_task_weights(self) -> dict[str, torch.Tensor | float]:
        self.last_weights = {n: w for n, w in zip(self.names, torch.exp(-self.log_variances).detach().unbind())}
        return self.last_weights

    def task_term(self, name: str, loss: torch.Tensor, weights: Mapping[str, torch.Tensor | float]) -> torch.Tensor:
        """``exp(-s_t) L_t + s_t`` of task ``name`` (with ``s_t`` live, so its own step trains it)."""
        s = self.log_variances[self.names.index(name)]
        return torch.exp(-s) * loss.float() + s


class DynamicWeightAverage(Weighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019, MTAN).

    During epoch ``e`` (counted from 0) the weights are

        ``w_t = T exp(r_t / temperature) / sum_i exp(r_i / temperature)``,  ``r_t = Lbar_t(e-1) / Lbar_t(e-2)``

    where ``Lbar_t(k)`` is the mean training loss of task ``t`` over the steps of epoch ``k``;
    every weight is 1 during the first two epochs (``e < 2``). The fixed loss weights are ignored.

    State (buffers, in the checkpoint): the running sum of each task's loss and the step count of
    the current epoch, the means of the last two finished epochs, the number of finished epochs and
    the epoch being accumulated. Each step's losses are first averaged over the processes of a
    distributed run (one all-reduce of ``T`` numbers per step), so every process holds the same
    state and the same weights, those of one process training on the whole batch (exactly so when
    each task loss is a mean over equal-sized per-process batches). A new epoch closes the previous
    one when its first step starts (:meth:`set_epoch`), so resuming at any step is exact.

    Args:
        temperature: softmax temperature (MTAN uses 2).
    """

    per_task_steps = True

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DynamicWeightAverage: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self._make_state(0)

    def _make_state(self, num_tasks: int) -> None:
        self.register_buffer("loss_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("history", torch.zeros(2, num_tasks, dtype=torch.float64))
        self.register_buffer("finished_epochs", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))

    def setup(self, names: Sequence[str], loss_weights: Mapping[str, float]) -> None:
        super().setup(names, loss_weights)
        self._make_state(self.num_tasks)

    def set_epoch(self, epoch: int) -> None:
        """Close the accumulated epoch (its mean joins the history) when ``epoch`` is a later one."""
        if epoch <= int(self.epoch):
            return
        if float(self.steps) > 0:
            mean = self.loss_sum / self.steps
            self.history.copy_(torch.stack([self.history[1], mean]))
            self.finished_epochs += 1
        self.loss_sum.zero_()
        self.steps.zero_()
        self.epoch.fill_(epoch)

    def weights(self) -> torch.Tensor:
        """The current weights, ``(T,)`` in task order."""
        if int(self.finished_epochs) < 2:
            return torch.ones(self.num_tasks, dtype=torch.float64, device=self.history.device)
        ratios = self.history[1] / self.history[0]
        return self.num_tasks * torch.softmax(ratios / self.temperature, dim=0)

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:
        return self._weighted(losses, self.weights().float())

    def per_task_weights(self) -> dict[str, torch.Tensor | float]:
        self.last_weights = {n: w for n, w in zip(self.names, self.weights().float().unbind())}
        return self.last_weights

    def update(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> None:
        stacked = reduce(self._stack(losses).detach().to(self.loss_sum))
        self.loss_sum += stacked
        self.steps += 1


class RandomLossWeighting(Weighting):
    """Random loss weighting (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022; arXiv 2111.10603, 2021).

    Every step draws ``w = T softmax(z)`` with ``z ~ N(0, I_T)`` from this strategy's own
    generator, seeded with ``seed``: every process of a distributed run draws the same weights, and
    the generator's state is in the checkpoint (``get_extra_state``), so a resumed run draws the
    weights an uninterrupted one would. The paper normalises the weights to sum to 1; scaling them
    to sum to ``T`` (the scale of equal weighting) is our choice. The fixed loss weights are ignored.

    Args:
        seed: seed of the weight generator.
    """

    per_task_steps = True

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def draw(self) -> torch.Tensor:
        """Next weights, ``(T,)`` in task order (advances the generator)."""
        z = torch.randn(self.num_tasks, generator=self.generator)
        return self.num_tasks * torch.softmax(z, dim=0)

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:
        return self._weighted(losses, self.draw())

    def per_task_weights(self) -> dict[str, torch.Tensor | float]:
        self.last_weights = {n: w for n, w in zip(self.names, self.draw().unbind())}
        return self.last_weights

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.detach().to("cpu", torch.uint8))


class FAMO(Weighting):
    """Fast Adaptive Multitask Optimization (Liu, Liu, Jin, Stone & Liu, NeurIPS 2023; arXiv 2306.03792).

    FAMO descends the weighted sum of the log-losses, ``sum_t z_t log L_t``, normalised by
    ``c = sum_t z_t / L_t``: its gradient is ``sum_t w_t grad L_t`` with ``w_t = z_t / (c L_t)``,
    ``z = softmax(xi)`` over learned task logits ``xi`` (initially 0: equal ``z``). polytask
    back-propagates ``sum_t T w_t L_t`` with the weights detached (the same gradient times ``T``,
    see below; the logged ``train/loss`` stays a weighted sum of losses). After each step the logits
    move so that tasks whose log-loss fell less get more weight: with ``delta_t = log L_t(before)
    - log L_t(after)``, the logits' gradient is ``J^T delta`` (``J`` the Jacobian of the softmax),
    applied by Adam with learning rate ``lr`` and L2 decay ``weight_decay`` (the authors' defaults:
    0.025 and 0.01).

    Our choices (the paper re-evaluates the step's batch with the updated network, one extra
    forward pass per step): ``L_t(after)`` is the loss of the next training step, on the next
    batch, so FAMO costs nothing beyond the step (the logits' update is one step late and sees the
    batch-to-batch noise); the weights are scaled to sum to ``T`` (equal weighting's scale; the
    paper's sum to 1); losses are shifted by ``eps`` and clamped at 0 (FAMO needs positive losses,
    which every polytask task loss is). The fixed loss weights are ignored.

    Under DDP the weights and the logits' update use the losses averaged over the processes (two
    all-reduces of ``T`` numbers per step), so every process holds the same logits and weights:
    those of one process training on the whole batch. State (buffers, in the checkpoint): the
    logits, Adam's moments and step count, and the last step's averaged losses, so a resumed run
    continues exactly.

    Args:
        lr: Adam learning rate of the logits (``beta`` in the paper).
        weight_decay: L2 decay of the logits (``gamma`` in the paper).
        eps: added to every loss before its log and inverse.
    """

    def __init__(self, lr: float = 0.025, weight_decay: float = 0.01, eps: float = 1e-8) -> None:
        super().__init__()
        if lr <= 0 or weight_decay < 0 or eps <= 0:
            raise ValueError(f"FAMO: need lr > 0, weight_decay >= 0, eps > 0; got {lr}, {weight_decay}, {eps}")
        self.lr, self.weight_decay, self.eps = float(lr), float(weight_decay), float(eps)
        self.betas = (0.9, 0.999)
        self._make_state(0)

    def _make_state(self, num_tasks: int) -> None:
        for name in ("logits", "exp_avg", "exp_avg_sq", "previous"):
            self.register_buffer(name, torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))

    def setup(self, names: Sequence[str], loss_weights: Mapping[str, float]) -> None:
        super().setup(names, loss_weights)
        self._make_state(self.num_tasks)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """``T w`` for the losses ``(T,)``: ``T z_t / (c (L_t + eps))``, summing to ``T``; ``(T,)`` float64."""
        z = torch.softmax(self.logits, dim=0)
        inverse = z / (losses.detach().to(z).clamp_min(0) + self.eps)
        return self.num_tasks * inverse / inverse.sum()

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:
        stacked = self._stack(losses)
        return self._weighted(losses, self.weights(reduce(stacked.detach())).to(stacked.dtype))

    def logit_gradient(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """``J^T delta`` with ``delta = log(before + eps) - log(after + eps)``; ``(T,)``."""
        delta = torch.log(before.clamp_min(0) + self.eps) - torch.log(after.clamp_min(0) + self.eps)
        z = torch.softmax(self.logits, dim=0)
        return z * delta - z * (z @ delta)

    def update(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> None:
        current = reduce(self._stack(losses).detach().to(self.previous))
        if bool(self.has_previous):
            self._adam_step(self.logit_gradient(self.previous, current))
        self.previous.copy_(current)
        self.has_previous.fill_(True)

    def _adam_step(self, grad: torch.Tensor) -> None:
        """One step of Adam with L2 decay (``torch.optim.Adam``'s ``weight_decay``) on :attr:`logits`."""
        beta1, beta2 = self.betas
        grad = grad + self.weight_decay * self.logits
        self.adam_steps += 1
        step = int(self.adam_steps)
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq / (1 - beta2**step)).sqrt().add_(1e-8)
        self.logits.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - beta1**step))


def last_layer_weight(net: nn.Module, shared: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """The weight of the last module (registration order) of ``net`` that holds a parameter of
    ``shared`` with two or more dimensions (norm layers and biases alone do not count): its
    parameter with the most dimensions (the last such); ``[]`` when none."""
    ids = {id(p) for p in shared}
    last: list[nn.Parameter] = []
    for module in net.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) in ids]
        if any(p.dim() >= 2 for p in own):
            last = own
    if not last:
        return []
    most = max(p.dim() for p in last)
    return [[p for p in last if p.dim() == most][-1]]


class GradNorm(Weighting):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018).

    Learnable task weights ``w_t`` (initially 1) scale the losses, ``total = sum_t w_t L_t``, and
    are trained only by GradNorm's own loss, which pulls each task's gradient norm on the shared
    weights ``W`` towards a common target that favours the tasks that trained least::

        G_t = w_t |grad_W L_t|,   r_t = (L_t / L_t(0)) / mean_s (L_s / L_s(0)),
        L_grad = sum_t |G_t - mean_s(G_s) r_t^alpha|    (the target held constant)

    ``L(0)`` are the losses of the first training step. The weights are parameters of the module
    (the module's optimizer trains them, with the gradient of ``L_grad`` only: the network's
    gradient is that of ``sum_t w_t L_t`` with the weights held constant) and are renormalised to
    sum to ``T`` before every step, as in the paper. Cost: ``T`` extra backward passes from the
    losses to ``W`` per step.

    Our choices: ``W`` is the weight of the last layer holding shared parameters
    (:func:`last_layer_weight` over :meth:`~polytask.models.base.MultiTaskNet.shared_parameters`, in
    registration order; the paper takes "the last shared layer", which a generic network does not
    name), or with
    ``parameters: all`` every shared parameter (exact, costlier); the weights are floored at
    ``1e-3`` before renormalising, so none turns negative. The fixed loss weights are ignored.
    Under DDP the per-task gradients on ``W`` and the losses are averaged over the processes, so
    every process computes the weights of one process with the whole batch.

    Args:
        alpha: the asymmetry ``alpha`` (the paper uses 1.5 on NYUv2, 0.12 on its synthetic tasks).
        parameters: ``last`` (default) or ``all`` shared parameters as ``W``.
    """

    def __init__(self, alpha: float = 1.5, parameters: str = "last") -> None:
        super().__init__()
        if parameters not in ("last", "all"):
            raise ValueError(f"GradNorm: parameters must be 'last' or 'all', got {parameters!r}")
        self.alpha = float(alpha)
        self.parameters_choice = parameters
        self.task_weights = nn.Parameter(torch.ones(0))
        self.register_buffer("initial_losses", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        self._shared: list[nn.Parameter] = []
        self._net_name = ""

    def setup(self, names: Sequence[str], loss_weights: Mapping[str, float]) -> None:
        super().setup(names, loss_weights)
        self.task_weights = nn.Parameter(torch.ones(self.num_tasks))
        self.initial_losses = torch.zeros(self.num_tasks, dtype=torch.float64)

    def attach(self, net: nn.Module) -> None:
        shared = shared_parameters_of(net)
        if self.parameters_choice == "last":
            shared = last_layer_weight(net, shared)
        self._shared = shared
        self._net_name = type(net).__name__

    def gradient_norms(self, stacked: torch.Tensor, reduce: Reduce = _identity) -> torch.Tensor:
        """``|grad_W L_t|`` for the losses ``(T,)`` (with their graphs), averaged over processes first; ``(T,)``."""
        if not self._shared:
            raise ValueError(
                f"GradNorm: {self._net_name} has no parameters shared by its tasks to normalise gradients on"
                if self._net_name
                else "GradNorm: attach(net) was not called, so it does not know the shared parameters"
            )
        return reduce(gradient_matrix(stacked.unbind(), self._shared)).norm(dim=1)

    def forward(self, losses: Mapping[str, torch.Tensor], reduce: Reduce = _identity) -> torch.Tensor:
        stacked = self._stack(losses)
        with torch.no_grad():
            self.task_weights.clamp_(min=1e-3).mul_(self.num_tasks / self.task_weights.sum())
        mean_losses = reduce(stacked.detach()).double()
        if not bool(self.has_initial):
            self.initial_losses.copy_(mean_losses)
            self.has_initial.fill_(True)
        norms = self.gradient_norms(stacked, reduce).detach()
        weights = self.task_weights
        grad_norms = weights * norms.to(weights)
        ratios = mean_losses / self.initial_losses.clamp_min(1e-12)
        relative = (ratios / ratios.mean()).to(weights)
        target = (grad_norms.mean() * relative**self.alpha).detach()
        grad_loss = (grad_norms - target).abs().sum()
        total = self._weighted(losses, weights.detach())
        return total + grad_loss - grad_loss.detach()  # the value of the weighted sum; gradient of L_grad for w
