"""Pipelined training steps: what the MPMD and SPMD runtimes share.

`parallelize` hands a plan with a `pipeline` here (see `jaxpar.emit.parallelize`). Every
check runs before anything compiles: the loss must be a `Stages`, the stack must cut into
the plan's chunks, the schedule must accept the microbatch count, and the batch must split
into microbatches over the data-parallel axes. The runtimes (`jaxpar.emit.mpmd`,
`jaxpar.emit.spmd`) return a `Pipelined`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from jaxpar.plan import Plan, PlanError
from jaxpar.planners.schedules.generators import Schedule, make_schedule
from jaxpar.tracing.params import ModelFn
from jaxpar.tracing.stages import Pieces, Stages


@dataclasses.dataclass(frozen=True)
class Pipelined:
    """A pipelined training step laid out by `plan` on `mesh`, used like `Parallelized`:
    `state = init(rng)`, `state, metrics = step(state, shard_batch(batch))`.
    `params_of(state)` gives the parameters in the model's own structure (the runtime may
    hold them cut into chunks); `loss_and_grads(params, batch)` the mean loss and gradient
    of a step without the optimizer, in that structure too."""

    plan: Plan
    mesh: Mesh
    schedule: Schedule
    init: Callable[[jax.Array], Any]
    step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]
    shard_batch: Callable[[Any], Any]
    params_of: Callable[[Any], dict]
    loss_and_grads: Callable[[dict, Any], tuple[jax.Array, dict]]


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
    plan.check_devices(num_devices)
    plan.check_pipeline()
    pieces = Pieces.of(model_fn, stages)
    plan = plan.bind(pieces.infos)
    chunk_layers = plan.pipeline.chunk_layers(plan.stages, pieces.num_layers)
    schedule = schedule_of(plan)
    for leaf in jax.tree.leaves(batch):
        plan.check_batch(leaf.shape[0])
    return plan, pieces, chunk_layers, schedule
