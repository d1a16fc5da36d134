"""TaskExpert (Ye & Xu, ICCV 2023): Memorial Mixture-of-Experts on a plain ViT.

Notation (docs/taskexpert.md): ``X^l`` are the ``L = h * w`` patch tokens ``(B, L, C)`` after
backbone block ``l``, ``T`` tasks, ``N`` experts, ``D`` the expert width, ``S`` the gate slots of a
layer (``N``, plus one when it reads the memory). At every MMoE layer

* experts ``E_n(X^l)`` ``(B, L, D)`` for ``n = 1..N``, computed as one matmul over stacked weights;
* per-task gates ``G_t = softmax(logits_t / tau)`` ``(B, L, S)`` (or one per image);
* the task feature ``F_t = sum_n G_t,n E_n + G_t,N+1 M_t`` (the memory ``M_t`` is the extra expert);
  without the memory slot (the "no memory" ablation) the memory enters with the fixed weight 1,
  ``F_t = sum_n G_t,n E_n + M_t``, so that every layer's features still reach the heads;
* the memory write ``M_t <- F_t`` (or ``M_t + F_t``, or an EMA).

Light heads predict every task from the final memory. The backbone is only read: nothing the
MMoE layers compute goes back into the ViT. ``gating: static`` (:class:`StaticTaskExpert`, the
static-decoding control) replaces every gate by the fixed weights ``1/N``: ``F = mean_n E_n + M``,
the same for every task. :func:`untrainable_reasons` refuses, before anything is built, every
switch combination in which some parameter could never receive a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from polytask.models.backbones import create_timm_model
from polytask.models.base import MultiTaskNet, forward_on_patch_grid, register_model
from polytask.models.heads import ImageHead
from polytask.tasks import Task

ExpertKind = Literal["mlp", "mlp2", "conv"]
GateInput = Literal["tokens", "tokens+context", "tokens+memory"]
GateGranularity = Literal["token", "image"]
MemoryWrite = Literal["replace", "accumulate", "ema"]
MemoryInit = Literal["none", "zeros"]
Gating = Literal["dynamic", "static"]
HeadKind = Literal["bilinear", "project", "deconv"]

_INIT_STD = 0.02


class ExpertBank(nn.Module):
    """``N`` experts applied to every token, all in one batched computation.

    Kinds (each ends with a per-expert LayerNorm and GELU):

    * ``mlp``: ``GELU(LN_n(X W_n + b_n))`` with ``W_n`` ``(C, D)``; one GEMM ``(B*L, C) x (C, N*D)``.
    * ``mlp2``: ``GELU(LN_n(GELU(X W_n + b_n) V_n + c_n))`` with ``V_n`` ``(D, D)``.
    * ``conv``: a 3x3 depthwise conv ``(C -> C)`` then a 1x1 conv ``(C -> D)`` per expert, on the token grid.

    Args:
        in_channels: token channels ``C``.
        width: expert output channels ``D``.
        num_experts: ``N``.
        kind: ``mlp``, ``mlp2`` or ``conv``.
    """

    def __init__(self, in_channels: int, width: int, num_experts: int, kind: ExpertKind = "mlp") -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if kind not in ("mlp", "mlp2", "conv"):
            raise ValueError(f"unknown expert kind {kind!r}; choose mlp, mlp2 or conv")
        self.kind = kind
        self.num_experts = num_experts
        self.width = width
        n, c, d = num_experts, in_channels, width
        if kind == "conv":
            self.depthwise = nn.Parameter(torch.empty(c, n, 3, 3))
            self.depthwise_bias = nn.Parameter(torch.zeros(c, n))
        self.weight = nn.Parameter(torch.empty(n, d, c))
        self.bias = nn.Parameter(torch.zeros(n, d))
        if kind == "mlp2":
            self.weight2 = nn.Parameter(torch.empty(n, d, d))
            self.bias2 = nn.Parameter(torch.zeros(n, d))
        self.norm_weight = nn.Parameter(torch.ones(n, d))
        self.norm_bias = nn.Parameter(torch.zeros(n, d))
        for name in ("weight", "weight2", "depthwise"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=_INIT_STD)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(B, L, C)`` tokens on an ``(h, w)`` grid -> expert features ``(B, L, N, D)``."""
        b, length, c = tokens.shape
        n, d = self.num_experts, self.width
        if self.kind == "conv":
            image = tokens.transpose(1, 2).reshape(b, c, *grid)
            spatial = F.conv2d(image, self.depthwise.reshape(c * n, 1, 3, 3), self.depthwise_bias.reshape(c * n),
                               padding=1, groups=c)
            feats = torch.einsum("bcnl,ndc->blnd", spatial.reshape(b, c, n, length), self.weight) + self.bias
        else:
            feats = F.linear(tokens, self.weight.reshape(n * d, c), self.bias.reshape(n * d)).view(b, length, n, d)
        if self.kind == "mlp2":
            feats = torch.einsum("blnd,ned->blne", F.gelu(feats), self.weight2) + self.bias2
        feats = F.layer_norm(feats, (d,)) * self.norm_weight + self.norm_bias
        return F.gelu(feats)


class TaskGates(nn.Module):
    """One context-aware gate per task, all tasks in one projection: softmax weights over ``S`` slots.

    Logits of task ``t`` (a linear gate on the concatenated inputs, written as a sum of projections):
    ``z_t = A_t x + [B_t mean_L(X)] + [U_t M_t]``, with ``x`` the token (granularity ``token``) or
    the mean token (granularity ``image``), then ``G_t = softmax((z_t + sigma * eps) / tau)`` with
    Gaussian noise ``eps`` during training only.

    Args:
        in_channels: token channels ``C``.
        width: memory channels ``D`` (used by the ``tokens+memory`` input).
        num_tasks: ``T``.
        num_slots: ``S``.
        gate_input: ``tokens``, ``tokens+context`` or ``tokens+memory``.
        granularity: ``token`` (one gate per token) or ``image`` (one gate per image).
        temperature: softmax temperature ``tau``.
        noise: standard deviation ``sigma`` of the training-time logit noise.
        with_memory_input: whether a memory exists at this layer to feed the ``tokens+memory`` input.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        num_tasks: int,
        num_slots: int,
        gate_input: GateInput = "tokens+context",
        granularity: GateGranularity = "token",
        temperature: float = 1.0,
        noise: float = 0.0,
        with_memory_input: bool = False,
    ) -> None:
        super().__init__()
        if gate_input not in ("tokens", "tokens+context", "tokens+memory"):
            raise ValueError(f"unknown gate_input {gate_input!r}")
        if granularity not in ("token", "image"):
            raise ValueError(f"unknown gate granularity {granularity!r}")
        if temperature <= 0:
            raise ValueError(f"gate temperature must be > 0, got {temperature}")
        self.num_tasks, self.num_slots = num_tasks, num_slots
        self.per_token = granularity == "token"
        self.temperature = temperature
        self.noise = noise
        self.token_proj = nn.Linear(in_channels, num_tasks * num_slots)
        self.context_proj = (
            nn.Linear(in_channels, num_tasks * num_slots, bias=False) if gate_input == "tokens+context" else None
        )
        self.memory_proj = (
            nn.Parameter(torch.empty(num_tasks, num_slots, width))
            if gate_input == "tokens+memory" and with_memory_input else None
        )
        for weight in (self.token_proj.weight, getattr(self.context_proj, "weight", None), self.memory_proj):
            if weight is not None:
                nn.init.trunc_normal_(weight, std=_INIT_STD)
        nn.init.zeros_(self.token_proj.bias)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """Tokens ``(B, L, C)``, memory ``(B, L, T, D)`` or None -> gate weights ``(B, L or 1, T, S)``."""
        b = tokens.shape[0]
        pooled = tokens.mean(dim=1, keepdim=True)
        logits = self.token_proj(tokens if self.per_token else pooled)
        if self.context_proj is not None:
            logits = logits + self.context_proj(pooled)
        logits = logits.view(b, -1, self.num_tasks, self.num_slots)
        if self.memory_proj is not None and memory is not None:
            source = memory if self.per_token else memory.mean(dim=1, keepdim=True)
            logits = logits + torch.einsum("bltd,tsd->blts", source, self.memory_proj)
        if self.training and self.noise > 0:
            logits = logits + self.noise * torch.randn_like(logits)
        return torch.softmax(logits / self.temperature, dim=-1)


class MMoELayer(nn.Module):
    """One Memorial Mixture-of-Experts layer: experts, per-task gates, memory read and write.

    The task feature is ``F_t = sum_n G_t,n E_n + G_t,N+1 M_t`` when the layer reads the memory
    (the memory is the ``N+1``-th gate slot), else ``F_t = sum_n G_t,n E_n + M_t`` (the memory
    carried with the fixed weight 1; no memory term when there is none yet). With static gating
    ``G_t,n = 1/N`` for every task and token and there are no gate parameters.

    Args:
        in_channels: backbone token channels ``C``.
        width: ``D``.
        num_tasks: ``T``.
        num_experts: ``N``.
        reads_memory: the gates get a memory slot (the memory ``M_t`` is the ``N+1``-th expert).
        zero_memory: the memory this layer receives is the all-zero initial one (no memory gate input then).
        expert: expert kind of :class:`ExpertBank`.
        memory_write: ``replace`` (``M <- F``), ``accumulate`` (``M <- M + F``) or ``ema``
            (``M <- m M + (1 - m) F``); with no memory yet, ``M <- F``.
        memory_momentum: ``m`` of the EMA write.
        gating: ``dynamic`` (:class:`TaskGates`) or ``static`` (fixed weights ``1/N``, no gate
            parameters; needs ``reads_memory`` false).
        gate_options: options of :class:`TaskGates` (input, granularity, temperature, noise).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        num_tasks: int,
        num_experts: int,
        reads_memory: bool,
        zero_memory: bool = False,
        expert: ExpertKind = "mlp",
        memory_write: MemoryWrite = "replace",
        memory_momentum: float = 0.5,
        gating: Gating = "dynamic",
        **gate_options: object,
    ) -> None:
        super().__init__()
        if memory_write not in ("replace", "accumulate", "ema"):
            raise ValueError(f"unknown memory_write {memory_write!r}; choose replace, accumulate or ema")
        if gating not in ("dynamic", "static"):
            raise ValueError(f"unknown gating {gating!r}; choose dynamic or static")
        if gating == "static" and reads_memory:
            raise ValueError("static gating has no gate slot to read the memory through")
        self.num_tasks = num_tasks
        self.num_experts = num_experts
        self.reads_memory = reads_memory
        self.memory_write = memory_write
        self.memory_momentum = memory_momentum
        self.experts = ExpertBank(in_channels, width, num_experts, expert)
        self.gates = (
            TaskGates(
                in_channels, width, num_tasks, num_experts + int(reads_memory),
                with_memory_input=reads_memory and not zero_memory,
                **gate_options,  # type: ignore[arg-type]
            )
            if gating == "dynamic" else None
        )

    def forward(
        self, tokens: torch.Tensor, memory: torch.Tensor | None, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, L, C)``, memory ``(B, L, T, D)`` or None -> (new memory ``(B, L, T, D)``,
        gate weights ``(B, L or 1, T, S)``; with static gating the constant ``1/N``, ``(B, 1, T, N)``)."""
        experts = self.experts(tokens, grid)
        if self.gates is None:
            b, n = tokens.shape[0], self.num_experts
            gates = experts.new_full((b, 1, self.num_tasks, n), 1.0 / n)
            fused = experts.mean(dim=2, keepdim=True).expand(-1, -1, self.num_tasks, -1)
        else:
            gates = self.gates(tokens, memory if self.reads_memory else None)
            fused = torch.matmul(gates[..., : self.num_experts], experts)
        if self.reads_memory:
            if memory is None:
                raise ValueError("this MMoE layer reads the memory but got none")
            fused = fused + gates[..., self.num_experts :] * memory
        elif memory is not None:
            fused = fused + memory
        if memory is None or self.memory_write == "replace":
            return fused, gates
        if self.memory_write == "accumulate":
            return memory + fused, gates
        return self.memory_momentum * memory + (1.0 - self.memory_momentum) * fused, gates


class TaskHead(nn.Module):
    """Dense head on the ``1/16`` memory map of one task, upsampled to the input size.

    ``bilinear``: bilinear x``scale`` -> Conv3x3 (``D -> hidden``)-BN-GELU -> Conv1x1 -> bilinear to the input size.
    ``project``: Conv1x1 (``D -> hidden``, on the token grid) -> bilinear x``scale`` -> Conv3x3
    (``hidden -> hidden``)-BN-GELU -> Conv1x1 -> bilinear to the input size: the final head of the
    authors' TaskPrompter (a 3x3 conv at 1/4 resolution on task features already reduced to a small
    width at 1/16), see docs/taskexpert.md, "Heads". The projection has no bias (the BatchNorm after
    the 3x3 conv would cancel it away from the image border); since a 1x1 conv commutes with
    bilinear upsampling, this is the ``bilinear`` head with its 3x3 conv factored through ``hidden``
    input channels, at ``hidden / D`` of its cost when ``hidden`` is small.
    ``deconv``: two (ConvTranspose 2x2 stride 2 -> BN -> GELU) -> Conv1x1 -> bilinear to the input size.

    ``body`` holds the hidden convolutions (its first module is the 3x3 conv of ``bilinear`` and
    ``project``), ``proj`` the projection of ``project`` (None otherwise), ``out`` the Conv1x1.

    Args:
        in_channels: memory width ``D``.
        out_channels: the task's output channels.
        hidden: channels of the hidden convolutions.
        kind: ``bilinear``, ``project`` or ``deconv``.
        scale: upsampling factor before the 3x3 conv of the ``bilinear`` and ``project`` heads
            (1: conv on the token grid); unused by ``deconv``.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, kind: HeadKind = "bilinear",
                 scale: int = 4) -> None:
        super().__init__()
        if kind not in ("bilinear", "project", "deconv"):
            raise ValueError(f"unknown head kind {kind!r}; choose bilinear, project or deconv")
        if scale < 1:
            raise ValueError(f"head scale must be >= 1, got {scale}")
        if hidden < 1:
            raise ValueError(f"head hidden channels must be >= 1, got {hidden}")
        self.kind = kind
        self.scale = scale
        self.proj = nn.Conv2d(in_channels, hidden, 1, bias=False) if kind == "project" else None
        if kind in ("bilinear", "project"):
            conv_in = hidden if kind == "project" else in_channels
            self.body = nn.Sequential(
                nn.Conv2d(conv_in, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.GELU()
            )
        else:
            self.body = nn.Sequential(
                nn.ConvTranspose2d(in_channels, hidden, 2, stride=2, bias=False), nn.BatchNorm2d(hidden), nn.GELU(),
                nn.ConvTranspose2d(hidden, hidden, 2, stride=2, bias=False), nn.BatchNorm2d(hidden), nn.GELU(),
            )
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``(B, D, h, w)`` -> ``(B, out_channels, *size)``."""
        if self.proj is not None:
            x = self.proj(x)
        if self.kind != "deconv" and self.scale > 1:
            x = F.interpolate(x, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
        y = self.out(self.body(x))
        return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)


def default_head_channels(head: HeadKind, width: int) -> int:
    """Hidden channels of the dense heads when ``head_channels`` is not given.

    ``project``: ``max(1, width // 4)``, our choice: the authors' heads reduce the task features to a
    small width before their 3x3 conv at 1/4 resolution (TaskPrompter's ViT-L PASCAL model: 350 of
    the ViT's 1024 channels), but their widths follow no fixed ratio; a quarter of the memory width
    keeps TaskExpert's training step within 1.15x of its bare backbone (docs/taskexpert.md, "Heads").
    ``bilinear`` and ``deconv``: ``width`` (no width change inside the head), as before.
    """
    return max(1, width // 4) if head == "project" else width


def untrainable_reasons(
    mmoe_blocks: Sequence[int],
    num_experts: int,
    gating: Gating,
    memory_read: bool,
    memory_write: MemoryWrite,
    memory_momentum: float,
    memory_init: MemoryInit,
) -> list[str]:
    """Why some parameter of a TaskExpert with these switches could never receive a gradient.

    Decided from the switches alone (no forward pass). Two things can cut a parameter off:

    * a gate with a single slot: the softmax over one logit is the constant 1, so the gate's
      projections get a zero gradient (dynamic gating with ``N = 1`` and no memory slot at a layer);
    * an EMA write with momentum 1: ``M <- M``, so a layer that receives a memory never writes its
      features and its experts and gates are cut off from the heads.

    Every other combination reaches every parameter: the memory is read through a gate slot with a
    strictly positive weight or carried with the fixed weight 1, so each layer's features reach the
    final memory (the test enumerates the switches and checks both directions).

    Args:
        mmoe_blocks: 1-based block numbers of the MMoE layers.
        num_experts: ``N``.
        gating: ``dynamic`` or ``static``.
        memory_read: the memory is a gate slot.
        memory_write: ``replace``, ``accumulate`` or ``ema``.
        memory_momentum: ``m`` of the EMA write.
        memory_init: ``none`` or ``zeros``.

    Returns:
        One message per problem, naming the switches (empty when every parameter can learn).
    """
    reasons = []
    if gating == "dynamic" and num_experts == 1:
        one_slot = [
            block for i, block in enumerate(mmoe_blocks)
            if not (memory_read and (i > 0 or memory_init == "zeros"))
        ]
        if one_slot:
            cause, fixes = (
                ("memory_init: none", "num_experts >= 2, gating: static or memory_init: zeros") if memory_read
                else ("memory_read: false", "num_experts >= 2, gating: static, or memory_read: true with "
                      "memory_init: zeros")
            )
            reasons.append(
                f"num_experts: 1 with {cause} gives the gate of the MMoE layer(s) after block(s) {one_slot} a "
                f"single slot: a softmax over one logit is the constant 1, so those gates never receive a "
                f"gradient; use {fixes}"
            )
    receives_memory = [block for i, block in enumerate(mmoe_blocks) if i > 0 or memory_init == "zeros"]
    if memory_write == "ema" and memory_momentum == 1.0 and receives_memory:
        reasons.append(
            f"memory_write: ema with memory_momentum: 1.0 keeps the memory unchanged (M <- M), so the MMoE "
            f"layer(s) after block(s) {receives_memory} never reach the heads and receive no gradient; "
            f"use memory_momentum < 1"
        )
    return reasons


def default_mmoe_blocks(depth: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced 1-based block numbers ending at ``depth`` (24 -> 6, 12, 18, 24)."""
    if depth % count:
        raise ValueError(f"cannot space {count} MMoE layers evenly over {depth} blocks; give mmoe_blocks")
    return [depth // count * (k + 1) for k in range(count)]


@register_model("taskexpert")
class TaskExpert(MultiTaskNet):
    """TaskExpert: a timm ViT read at several blocks by MMoE layers sharing a multi-task feature memory.

    Args:
        tasks: the tasks to predict.
        backbone: timm ViT name (patch tokens, e.g. ``vit_large_patch16_384.augreg_in21k_ft_in1k``).
        pretrained: load timm pretrained weights.
        pretrained_file: local weights file for offline use.
        backbone_options: extra ``timm.create_model`` options (``img_size``, ``drop_path_rate``...).
        mmoe_blocks: 1-based numbers of the blocks after which an MMoE layer reads the tokens
            (default: 4 evenly spaced, the last block included: 6/12/18/24 for ViT-L, 3/6/9/12 for ViT-B).
        final_norm_on_last: apply the ViT's final LayerNorm to the tokens of the last MMoE block.
        num_experts: experts ``N`` per MMoE layer.
        expert: ``mlp`` (Linear-LN-GELU), ``mlp2`` (two linear layers) or ``conv`` (depthwise 3x3 + 1x1).
        width: ``D``, the expert and memory width.
        gate_input: ``tokens``, ``tokens+context`` (tokens and the mean token) or ``tokens+memory``.
        gate_granularity: ``token`` (a gate per token) or ``image`` (one gate per image).
        gate_temperature: softmax temperature.
        gate_noise: standard deviation of Gaussian noise on the gate logits during training.
        memory_read: the memory is an extra expert in every gate; False is the "no memory" ablation
            (no memory slot: the memory is added to the gated experts with the fixed weight 1, so every
            layer's task features still reach the heads).
        memory_write: ``replace``, ``accumulate`` or ``ema``.
        memory_momentum: weight ``m`` of the old memory in the ``ema`` write, in ``[0, 1]`` (1 is refused
            where a layer receives a memory: it would never write).
        memory_init: ``none`` (no memory slot at the first MMoE layer) or ``zeros``.
        head: dense head kind (:class:`TaskHead`): ``project`` (default: Conv1x1 ``D -> head_channels`` on
            the token grid, then the 3x3 conv at ``1/16 * head_scale``, the final head of the authors'
            TaskPrompter), ``bilinear`` (the 3x3 conv ``D -> head_channels`` after upsampling) or
            ``deconv``; image-level tasks use :class:`ImageHead`.
        head_channels: hidden channels of the dense heads (default: ``width // 4`` for ``project``,
            ``width`` for ``bilinear`` and ``deconv``; see :func:`default_head_channels`).
        head_scale: upsampling of the ``project`` and ``bilinear`` heads before their 3x3 conv (4: at
            1/4 of the input size).
        channels_last: run the dense heads in channels-last memory format.
        balance_weight: coefficient of the load-balancing loss returned by :meth:`aux_loss` (0 disables it).
        gating: ``dynamic`` (per-task context-aware gates, the method) or ``static`` (the static-decoding
            control: every expert weighted ``1/N`` for every task, no gate parameters; needs
            ``memory_read: false`` and ``balance_weight: 0``; the ``gate_*`` options are then unused).

    Raises:
        ValueError: for an unknown or inconsistent option, and for every switch combination in which
            some parameter could never receive a gradient (:func:`untrainable_reasons`).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        backbone: str = "vit_base_patch16_384.augreg_in21k_ft_in1k",
        pretrained: bool = False,
        pretrained_file: str | None = None,
        backbone_options: dict | None = None,
        mmoe_blocks: Sequence[int] | None = None,
        final_norm_on_last: bool = True,
        num_experts: int = 8,
        expert: ExpertKind = "mlp",
        width: int = 256,
        gate_input: GateInput = "tokens+context",
        gate_granularity: GateGranularity = "token",
        gate_temperature: float = 1.0,
        gate_noise: float = 0.0,
        memory_read: bool = True,
        memory_write: MemoryWrite = "replace",
        memory_momentum: float = 0.5,
        memory_init: MemoryInit = "none",
        head: HeadKind = "project",
        head_channels: int | None = None,
        head_scale: int = 4,
        channels_last: bool = True,
        balance_weight: float = 0.0,
        gating: Gating = "dynamic",
    ) -> None:
        super().__init__(tasks)
        if memory_init not in ("none", "zeros"):
            raise ValueError(f"unknown memory_init {memory_init!r}; choose none or zeros")
        if gate_input == "tokens+memory" and not memory_read:
            raise ValueError("gate_input 'tokens+memory' needs memory_read: true")
        if gating == "static" and memory_read:
            raise ValueError("gating: static has no gate slot to read the memory through; set memory_read: false "
                             "(the memory is then carried with the fixed weight 1)")
        if gating == "static" and balance_weight > 0:
            raise ValueError("gating: static has no gates to balance; set balance_weight: 0")
        if memory_write == "ema" and not 0.0 <= memory_momentum <= 1.0:
            raise ValueError(f"memory_momentum must be in [0, 1], got {memory_momentum}")
        options = dict(backbone_options or {})
        if "img_size" in options:
            options["img_size"] = tuple(options["img_size"])
        vit = create_timm_model(backbone, pretrained=pretrained, pretrained_file=pretrained_file, **options)
        if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "patch_embed"):
            raise ValueError(f"TaskExpert needs a timm ViT with patch tokens, got {backbone!r}")
        depth = len(vit.blocks)
        self.mmoe_blocks = list(mmoe_blocks) if mmoe_blocks is not None else default_mmoe_blocks(depth)
        if not self.mmoe_blocks or sorted(set(self.mmoe_blocks)) != self.mmoe_blocks:
            raise ValueError(f"mmoe_blocks must be strictly increasing, got {self.mmoe_blocks}")
        if self.mmoe_blocks[0] < 1 or self.mmoe_blocks[-1] > depth:
            raise ValueError(f"mmoe_blocks {self.mmoe_blocks} outside 1..{depth} (1-based block numbers)")
        reasons = untrainable_reasons(self.mmoe_blocks, num_experts, gating, memory_read, memory_write,
                                      memory_momentum, memory_init)
        if reasons:
            raise ValueError("TaskExpert refuses to build: " + "; ".join(reasons))
        self.take_indices = [k - 1 for k in self.mmoe_blocks]
        vit.prune_intermediate_layers(self.take_indices, prune_norm=not final_norm_on_last, prune_head=True)
        self.backbone = vit
        self.final_norm_on_last = final_norm_on_last
        self.num_experts = num_experts
        self.width = width
        self.balance_weight = balance_weight
        channels = int(vit.embed_dim)
        num_tasks = len(self.tasks)
        self.mmoe = nn.ModuleList(
            MMoELayer(
                channels, width, num_tasks, num_experts,
                reads_memory=memory_read and (i > 0 or memory_init == "zeros"),
                zero_memory=i == 0 and memory_init == "zeros",
                expert=expert, memory_write=memory_write, memory_momentum=memory_momentum, gating=gating,
                gate_input=gate_input, granularity=gate_granularity, temperature=gate_temperature, noise=gate_noise,
            )
            for i in range(len(self.mmoe_blocks))
        )
        self.zero_memory = memory_init == "zeros"
        hidden = head_channels if head_channels is not None else default_head_channels(head, width)
        self.heads = nn.ModuleDict({
            t.name: TaskHead(width, t.out_channels, hidden, head, head_scale) if t.dense
            else ImageHead(width, t.out_channels)
            for t in self.tasks
        })
        self.channels_last = channels_last
        if channels_last:
            self.heads.to(memory_format=torch.channels_last)
        self.record_gates = False
        self.gate_record: list[torch.Tensor] = []
        self.learned_gates = gating == "dynamic"
        """Whether the gate weights are learned (TaskExpert) or the fixed ``1/N`` (the static control)."""
        self._balance_loss: torch.Tensor | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """The resolution ``(H, W)`` the ViT's position embeddings were built for."""
        size = self.backbone.patch_embed.img_size
        return int(size[0]), int(size[1])

    def gate_slot_names(self) -> list[list[str]]:
        """Names of the gate slots of every MMoE layer: ``e0 .. e{N-1}`` and ``memory`` when read."""
        experts = [f"e{n}" for n in range(self.num_experts)]
        return [experts + (["memory"] if layer.reads_memory else []) for layer in self.mmoe]

    def shared_backbone(self) -> nn.Module:
        """The ViT (``(B, 3, H, W)`` -> tokens), which the MMoE layers only read."""
        return self.backbone

    def shared_parameters(self) -> list[nn.Parameter]:
        """The ViT's and the experts' trainable parameters (not the gates, which are per task, nor the heads)."""
        experts = [p for layer in self.mmoe for p in layer.experts.parameters()]
        return [p for p in (*self.backbone.parameters(), *experts) if p.requires_grad]

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "backbone": list(self.backbone.parameters()),
            "mmoe": list(self.mmoe.parameters()),
            "heads": list(self.heads.parameters()),
        }

    def backbone_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> patch tokens ``(B, L, C)`` after every MMoE block (final norm on the last if set)."""
        tokens = self.backbone.forward_intermediates(
            images, indices=self.take_indices, norm=False, output_fmt="NLC", intermediates_only=True
        )
        if self.final_norm_on_last:
            tokens[-1] = self.backbone.norm(tokens[-1])
        return tokens

    def task_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(B, 3, H, W)`` -> (final memory ``(B, L, T, D)``, gate weights ``(B, L or 1, T, S_l)`` per layer)."""
        grid = self.backbone.patch_embed.dynamic_feat_size((images.shape[-2], images.shape[-1]))
        tokens = self.backbone_tokens(images)
        memory = None
        if self.zero_memory:
            memory = tokens[0].new_zeros(tokens[0].shape[0], tokens[0].shape[1], len(self.tasks), self.width)
        gates_per_layer = []
        for layer, x in zip(self.mmoe, tokens):
            memory, gates = layer(x, memory, grid)
            gates_per_layer.append(gates)
        return memory, gates_per_layer

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``{task: (B, C_t, H, W) or (B, C_t)}``.

        A size that is not a multiple of the patch size is padded with zeros at the bottom and
        right (the mean colour of normalised images) to the next multiple, and the dense outputs
        are cropped back to ``(H, W)``: every pixel keeps its place on the token grid.
        """
        return forward_on_patch_grid(self._forward_padded, images, self.backbone.patch_embed.patch_size)

    def _forward_padded(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward` of images whose size is a multiple of the patch size."""
        b = images.shape[0]
        size = (images.shape[-2], images.shape[-1])
        h, w = self.backbone.patch_embed.dynamic_feat_size(size)
        memory, gates = self.task_features(images)
        if self.record_gates:
            self.gate_record = [
                g.detach().float().permute(0, 2, 3, 1).expand(-1, -1, -1, h * w).reshape(b, *g.shape[2:], h, w)
                for g in gates
            ]
        if self.balance_weight > 0:
            self._balance_loss = self.balance_weight * balance_loss(gates, self.num_experts)
        maps = memory.reshape(b, h, w, len(self.tasks), self.width)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        task_maps = [maps[..., i, :].permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
                     for i in range(len(self.tasks))]
        return {task.name: self.heads[task.name](m, size) for task, m in zip(self.tasks, task_maps)}

    def aux_loss(self) -> torch.Tensor:
        """The weighted load-balancing loss of the last forward (a zero scalar when disabled)."""
        if self.balance_weight > 0 and self._balance_loss is not None:
            return self._balance_loss
        return torch.zeros((), device=next(self.parameters()).device)


@register_model("taskexpert_static")
class StaticTaskExpert(TaskExpert):
    """The static-decoding control of TaskExpert: the same network with every gate fixed.

    Same backbone, MMoE blocks, ``N`` experts per layer, memory write and heads (same width and
    resolution) as :class:`TaskExpert`; the only difference is the assembling: at every layer
    ``F = mean_n E_n + M`` (``M`` the previous memory, absent at the first layer), the same feature
    for every task, instead of the per-task, sample-dependent gated sum. Averaging the ``N``
    experts keeps the expert capacity and cost of TaskExpert (one expert of width ``D`` would have
    ``1/N`` of it); ``num_experts: 1`` gives the one-expert control. Options as in :class:`TaskExpert`.
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        backbone: str = "vit_base_patch16_384.augreg_in21k_ft_in1k",
        pretrained: bool = False,
        pretrained_file: str | None = None,
        backbone_options: dict | None = None,
        mmoe_blocks: Sequence[int] | None = None,
        final_norm_on_last: bool = True,
        num_experts: int = 8,
        expert: ExpertKind = "mlp",
        width: int = 256,
        memory_write: MemoryWrite = "replace",
        memory_momentum: float = 0.5,
        head: HeadKind = "project",
        head_channels: int | None = None,
        head_scale: int = 4,
        channels_last: bool = True,
    ) -> None:
        super().__init__(
            tasks, backbone=backbone, pretrained=pretrained, pretrained_file=pretrained_file,
            backbone_options=backbone_options, mmoe_blocks=mmoe_blocks, final_norm_on_last=final_norm_on_last,
            num_experts=num_experts, expert=expert, width=width, memory_read=False, memory_write=memory_write,
            memory_momentum=memory_momentum, head=head, head_channels=head_channels, head_scale=head_scale,
            channels_last=channels_last, gating="static",
        )


def balance_loss(gates: Sequence[torch.Tensor], num_experts: int) -> torch.Tensor:
    """Mean over layers and tasks of the squared coefficient of variation of expert importance.

    The importance of expert ``n`` for task ``t`` is its mean gate weight over images and tokens;
    ``CV^2 = Var_n / Mean_n^2`` is 0 when every expert is used equally. The memory slot is excluded.

    Args:
        gates: per layer, gate weights ``(B, L or 1, T, S)`` whose first ``num_experts`` slots are experts.
        num_experts: ``N``.
    """
    losses = []
    for g in gates:
        importance = g[..., :num_experts].float().mean(dim=(0, 1))
        cv2 = importance.var(dim=-1, unbiased=False) / importance.mean(dim=-1).square().clamp_min(1e-12)
        losses.append(cv2.mean())
    return torch.stack(losses).mean()
