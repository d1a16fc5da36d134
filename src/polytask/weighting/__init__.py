"""Loss weighting strategies: how the task losses of a training step become one total.

A strategy is chosen independently of the network (LibMTL's idea), with
``model.init_args.weighting`` (a class path and its ``init_args``, as for the optimizer); the
default, :class:`FixedWeighting`, is the weighted sum polytask has always used. See
docs/weighting.md.

Every strategy is an ``nn.Module`` owned by :class:`~polytask.training.MultiTaskModule`, so its
learnable parameters reach the optimizer and its state is in the Lightning checkpoint as tensors
(buffers, or ``get_extra_state``). The module drives it through three calls per training step:

1. :meth:`Weighting.set_epoch` with the current epoch, before anything else;
2. ``weighting(losses, reduce)`` (:meth:`Weighting.forward`): the total to back-propagate (a
   strategy whose weights depend on the losses computes them from the process-averaged losses);
3. :meth:`Weighting.update` with the detached losses and a ``reduce`` function that averages a
   tensor over the processes of a distributed run (identity in one process).

:attr:`Weighting.last_weights` holds the weights of the last total, for logging.
"""

from polytask.weighting.aggregation import AggregatorKind, GradientAggregation, LeastSquaresProjector, build_aggregator
from polytask.weighting.base import Reduce, Weighting, gradient_matrix, shared_parameters_of
from polytask.weighting.losses import (
    FAMO,
    DynamicWeightAverage,
    EqualWeighting,
    FixedWeighting,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
    last_layer_weight,
)

__all__ = [
    "FAMO",
    "AggregatorKind",
    "DynamicWeightAverage",
    "EqualWeighting",
    "FixedWeighting",
    "GradNorm",
    "GradientAggregation",
    "LeastSquaresProjector",
    "RandomLossWeighting",
    "Reduce",
    "UncertaintyWeighting",
    "Weighting",
    "build_aggregator",
    "gradient_matrix",
    "last_layer_weight",
    "shared_parameters_of",
]
