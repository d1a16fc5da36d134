"""Lightning's model summary with the network's real forward FLOPs.

Lightning counts FLOPs by running ``example_input_array`` through the module; polytask's modules
have none (their input size is the datamodule's), so its summary printed ``Total FLOPs: 0``. These
callbacks count one image at the training resolution instead (attention through the math backend,
see :func:`polytask.models.summary.flop_counter`). The CLI puts them in place of Lightning's own.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary

from polytask.models.summary import flop_counter, training_resolution


class _NetFlops:
    """Mixin over a Lightning model-summary callback: FLOPs of ``pl_module.net`` on one image."""

    def _summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        summary = super()._summary(trainer, pl_module)  # type: ignore[misc]
        net = getattr(pl_module, "net", None)
        size = training_resolution(net, trainer.datamodule) if net is not None else None
        if size is not None and hasattr(summary, "_flop_counter"):
            # through the module, so the counter names layers as the summary table does
            summary._flop_counter = flop_counter(pl_module, size)
        return summary


class NetFlopsModelSummary(_NetFlops, ModelSummary):
    """:class:`~lightning.pytorch.callbacks.ModelSummary` whose total FLOPs are one image's at the training resolution."""


class NetFlopsRichModelSummary(_NetFlops, RichModelSummary):
    """:class:`~lightning.pytorch.callbacks.RichModelSummary` whose total FLOPs are one image's at the training resolution."""


def with_net_flops(callback: pl.Callback) -> pl.Callback:
    """The FLOP-counting equivalent of Lightning's own summary callback (any other callback unchanged)."""
    replacement = {ModelSummary: NetFlopsModelSummary, RichModelSummary: NetFlopsRichModelSummary}.get(type(callback))
    if replacement is None:
        return callback
    summary = replacement(max_depth=callback._max_depth)  # type: ignore[attr-defined]
    summary._summarize_kwargs = callback._summarize_kwargs  # type: ignore[attr-defined]
    return summary
