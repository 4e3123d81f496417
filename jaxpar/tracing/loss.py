"""What a loss returns, read with shapes only before anything compiles.

A loss returns a scalar, or a pair `(loss, aux)` as `jax.value_and_grad(..., has_aux=True)`
takes it: `aux` is a pytree of arrays (accuracy, router losses, ...), which the step averages
over the batch shards and microbatches and returns as `metrics["aux"]`. Anything else is
refused here, naming what it returned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar import context
from jaxpar.plan import Plan, PlanError
from jaxpar.tracing.params import LossFn


def loss_output(out: Any) -> tuple[Any, Any]:
    """(loss, aux) of what a loss returned (aux None for a bare loss), arrays, tracers or
    ShapeDtypeStructs; a PlanError unless the loss is a float scalar."""
    loss, aux = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    dtype = getattr(loss, "dtype", None)
    if getattr(loss, "shape", None) != () or dtype is None or not jnp.issubdtype(
            dtype, jnp.floating):
        got = jax.tree.map(lambda x: f"{getattr(x, 'dtype', type(x).__name__)}"
                                     f"{list(getattr(x, 'shape', []))}", out)
        raise PlanError(f"the loss returned {got}; return a float scalar, or a pair "
                        "(loss, aux) with aux a pytree of arrays (returned averaged in "
                        "metrics['aux'])")
    return loss, aux


@dataclasses.dataclass(frozen=True)
class LossProbe:
    """`has_aux`: the loss returns (loss, aux). `unrolled`: the parameters of the layers the
    model passes to `jaxpar.layer` one module at a time (a list of blocks, not a stack),
    which `jaxpar.layer` gathers, so a step must not gather them before."""

    has_aux: bool
    unrolled: frozenset[str]


def probe_loss(graphdef: nnx.GraphDef, params_shape: dict, loss_fn: LossFn, batch: Any,
               plan: Plan, variables_shape: dict | None = None) -> LossProbe:
    """Trace `loss_fn` on the model (parameters, other variables) with shapes only, under
    `plan` with nothing manual."""
    def run(params: dict, variables: dict, batch: Any) -> Any:
        return loss_fn(context.merge(graphdef, params, variables), batch)

    with context.active(plan, ()) as current:
        out = jax.eval_shape(run, params_shape, variables_shape or {}, batch)
    _, aux = loss_output(out)
    return LossProbe(aux is not None, frozenset(current.seen))
