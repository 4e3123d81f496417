"""What `parallelize` returns for every form of plan: one type, one way to use it.

`state = par.init(rng)`, then `state, metrics = par.step(state, par.shard_batch(batch))`;
`par.checkpointer(directory, save_every)` saves and restores that state in its own layout.
The state is a `TrainState` (flat and SPMD forms; the SPMD form stores the layer stack cut
into chunks) or a tuple of one `TrainState` per chunk, each on its stage (MPMD form);
`params_of(state)` gives the parameters in the model's own structure either way, and
`variables_of(state)` its other variables (batch statistics, RNG streams).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from jaxpar.emit.state import TrainState
from jaxpar.plan import Plan, PlanError
from jaxpar.planners.schedules.generators import Schedule
from jaxpar.runtime.checkpoint import Checkpointer


@dataclasses.dataclass(frozen=True)
class Parallelized:
    """A training step laid out by `plan` on `mesh`.

    `state_sharding` and `abstract_state` (ShapeDtypeStructs with their shardings) have the
    state's structure. `loss_and_grads(params, batch)` is the mean loss and gradient of one
    step without the optimizer, parameters and gradient in the model's structure (a model
    with other variables also takes `variables=`, in its structure).
    `schedule` is the pipeline's (None without one)."""

    plan: Plan
    mesh: Mesh
    state_sharding: Any
    abstract_state: Any
    init: Callable[[jax.Array], Any]
    step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]
    shard_batch: Callable[[Any], Any]
    params_of: Callable[[Any], dict]
    loss_and_grads: Callable[[dict, Any], tuple[jax.Array, dict]]
    schedule: Schedule | None = None
    variables_of: Callable[[Any], dict] = lambda state: state.variables  # flat: as stored

    def steps_done(self, state: Any) -> int:
        """How many updates `state` has had."""
        return int((state if isinstance(state, TrainState) else state[0]).step)

    def lower(self, batch: Any) -> jax.stages.Lowered:
        """The step lowered for `batch`'s shapes, to read its HLO or compile it."""
        if not hasattr(self.step, "lower"):
            raise PlanError("the MPMD form runs one program per stage and op, not one step "
                            "program; lower a flat or SPMD plan, or read a stage's programs")
        return self.step.lower(self.abstract_state, batch)

    def checkpointer(self, directory: str | os.PathLike, save_every: int,
                     keep: int = 2) -> Checkpointer:
        """Checkpoints of this step's state in `directory`: every `save_every` steps, the
        last `keep`; `restore()` lays the latest out as `abstract_state`."""
        return Checkpointer(directory, save_every, self.abstract_state, keep)
