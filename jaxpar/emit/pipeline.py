"""Pipelined training steps: the checks the MPMD and SPMD runtimes share.

`jaxpar.parallelize` hands a plan with a `pipeline` here. Every check runs before anything
compiles: the loss must be a `Stages`, the stack must cut into the plan's chunks, the
model's variables must be ones the runtimes update as one device would (batch statistics
with microbatches=1: `jaxpar.emit.variables.check_pipeline`), the schedule must accept the
microbatch count, and the batch must split into microbatches over the data-parallel axes.
The runtimes (`jaxpar.runtime.driver`, `jaxpar.emit.spmd`) return a `Parallelized`.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxpar.emit.variables import check_pipeline
from jaxpar.plan import Plan, PlanError
from jaxpar.planners.schedules.generators import Schedule, make_schedule
from jaxpar.tracing.loss import probe_loss
from jaxpar.tracing.params import ModelFn
from jaxpar.tracing.stages import Pieces, Stages


def schedule_of(plan: Plan) -> Schedule:
    """The plan's schedule; a microbatch count it refuses is a PlanError with the fix."""
    pp = plan.pipeline
    try:
        return make_schedule(pp.schedule, plan.stages, plan.microbatches, pp.virtual)
    except ValueError as error:
        raise PlanError(str(error)) from None


def checked(model_fn: ModelFn, stages: Any, plan: Plan, batch: Any,
            num_devices: int) -> tuple[Plan, Pieces, tuple[int, ...], Schedule]:
    """Validate a pipelined plan for this model and batch: the bound plan, the model's
    pieces, the layers of each chunk and the schedule."""
    if not isinstance(stages, Stages):
        raise PlanError("a pipelined plan needs the loss as a jaxpar.Stages (what runs before, "
                        f"in and after the layer stack); got {type(stages).__name__}")
    pieces = Pieces.of(model_fn, stages)
    plan = plan.check(pieces.infos, [leaf.shape[0] for leaf in jax.tree.leaves(batch)],
                      num_devices, pieces.num_layers)
    check_pipeline(plan, pieces.variables, jax.tree.leaves(batch)[0].shape[0])
    if probe_loss(pieces.graphdef, pieces.params_shape, stages, batch, plan,
                  pieces.variables_shape).has_aux:
        raise PlanError("the loss returns (loss, aux): a pipelined plan runs a loss alone for "
                        "now; return the loss only from the Stages' post, or use a plan "
                        "without a pipeline")
    chunk_layers = plan.pipeline.chunk_layers(plan.stages, pieces.num_layers)
    return plan, pieces, chunk_layers, schedule_of(plan)
