"""The calls a benchmark times: training step and inference of the network, the bare network and the per-task mode, per precision and compilation."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from polytask.profiling.timing import Variant, autocast
from polytask.training.module import MultiTaskModule


def _step_module(module: MultiTaskModule, net: nn.Module, device: torch.device, own_weighting: bool) -> MultiTaskModule:
    """A module with ``module``'s tasks, loss weights and weighting strategy around ``net``, on
    ``device``: its ``training_step`` and ``backward`` are the real ones. ``own_weighting``: the
    strategy is ``module``'s own object, else a copy (a strategy attaches to one network)."""
    weighting = module.weighting if own_weighting else copy.deepcopy(module.weighting)
    step = MultiTaskModule(net=lambda tasks: net, tasks=module.tasks, loss_weights=module.loss_weights, weighting=weighting)
    step.weighting.to(device)
    return step


def _train_call(
    step_module: MultiTaskModule, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer, precision: str, device: torch.device
) -> Callable[[], None]:
    """One training step as Lightning runs it: ``training_step``, the module's ``backward`` (a
    strategy may compute the gradients itself), the optimizer step."""

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = step_module.training_step(batch, 0)
        step_module.backward(loss)
        optimizer.step()

    return run


def _refused_call(error: Exception) -> Callable[[], None]:
    """A training step that cannot run: raises ``error`` when timed, so the report lists the variant as skipped."""

    def run() -> None:
        raise error

    return run


def _infer_call(forward: Callable[[], object], precision: str, device: torch.device) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode(), autocast(precision, device):
            forward()

    return run


def _per_task_train_call(
    task_forward: Callable[[torch.Tensor, str], torch.Tensor],
    module: MultiTaskModule,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    precision: str,
    device: torch.device,
) -> Callable[[], None]:
    """Per-task training as :class:`~polytask.training.per_task.PerTaskModule` does it: for every
    task in turn, its own forward (``forward_task``), weighted loss, backward and optimizer step."""

    def run() -> None:
        for task in module.tasks:
            optimizer.zero_grad(set_to_none=True)
            with autocast(precision, device):
                loss = module.loss_weights[task.name] * task.loss(task_forward(batch["image"], task.name), batch[task.name])
            loss.backward()
            optimizer.step()

    return run


def build_variants(
    nets: Mapping[str, nn.Module],
    module: MultiTaskModule,
    batch: Mapping[str, torch.Tensor],
    precisions: Sequence[str],
    compile_nets: bool,
    device: torch.device,
) -> list[Variant]:
    """Training and inference variants of every net (``model``, ``bare``, ``per_task``) in every precision.

    ``model`` and ``bare`` train with :class:`MultiTaskModule`'s ``training_step`` (all tasks, one
    optimizer step); ``per_task`` is ``nets["per_task"]`` (the model) run through its
    ``forward_task``: inference is one call per task, training one step per task
    (:func:`_per_task_train_call`). Compiled variants compile ``forward`` (``forward_task`` for
    ``per_task``). All nets share one optimizer of the config's kind over their parameters.
    """
    params = {id(p): p for net in nets.values() for p in net.parameters() if p.requires_grad}
    optimizer = module.optimizer_factory(list(params.values()))
    images = batch["image"]
    variants: list[Variant] = []
    for name, net in nets.items():
        for compiled in (False, True) if compile_nets else (False,):
            if name == "per_task":
                task_forward = torch.compile(net.forward_task) if compiled else net.forward_task
                for precision in precisions:
                    train = _per_task_train_call(task_forward, module, batch, optimizer, precision, device)
                    infer = _infer_call(lambda f=task_forward: [f(images, t.name) for t in module.tasks], precision, device)
                    variants.append(Variant(name, precision, compiled, "train", net.train, train))
                    variants.append(Variant(name, precision, compiled, "infer", net.eval, infer))
                continue
            forward = torch.compile(net) if compiled else net
            try:
                step_module: MultiTaskModule | None = _step_module(module, forward, device, own_weighting=name == "model")
            except ValueError as err:  # the strategy does not fit this variant (e.g. no shared representation)
                if name == "model":
                    raise
                step_module, refusal = None, err
            for precision in precisions:
                train = _train_call(step_module, batch, optimizer, precision, device) if step_module is not None else _refused_call(refusal)
                infer = _infer_call(lambda f=forward: f(images), precision, device)
                variants.append(Variant(name, precision, compiled, "train", net.train, train))
                variants.append(Variant(name, precision, compiled, "infer", net.eval, infer))
    return variants


def unused_parameters(net: nn.Module, train: Variant | None) -> list[str] | None:
    """Trainable parameters of ``net`` that get no gradient in one batched training step (``None``: not run).

    DDP needs ``strategy: ddp_find_unused_parameters_true`` for networks that have any.
    """
    if train is None:
        return None
    train.prepare()
    net.zero_grad(set_to_none=True)
    train.run()
    return [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
