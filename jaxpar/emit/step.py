"""The emitter: a Plan, a model, an optimizer and a loss become a sharded, jitted train step.

`init` creates parameters and optimizer state under `jit` with the plan's output shardings,
so no full-size array ever exists on one device. `step` runs forward and backward in a
`shard_map` manual over the batch mesh axes and automatic over the rest (see
docs/plans.md), accumulates microbatches, and applies the optax update to the donated state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpar import context
from jaxpar.emit.parallelized import Parallelized
from jaxpar.emit.shardings import by_path, make_mesh, state_sharding_of
from jaxpar.emit.state import TrainState, apply_gradients, init_state
from jaxpar.plan import ParamInfo, Plan, PlanError
from jaxpar.tracing.params import LossFn, ModelFn, abstract_params


def require_layer(plan: Plan, active: context.Active) -> None:
    """A plan with a remat policy needs the model to have marked its layer (else the policy
    is a no-op)."""
    if plan.remat != "none" and not active.layer_called:
        raise PlanError(f"the plan asks for remat={plan.remat!r} but the model never wraps a "
                        "layer in jaxpar.layer; wrap its repeated block or set remat='none'")


def split_microbatches(batch: Any, m: int) -> Any:
    """Split the leading dimension into m microbatches: (m, batch / m, ...); row i * m + j
    of the shard goes to microbatch j, in every form."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1),
                        batch)


def _loss_and_grads(plan: Plan, mesh: Mesh, graphdef: nnx.GraphDef, loss_fn: LossFn,
                    params_shape: dict, unrolled: frozenset[str]
                    ) -> Callable[[dict, Any], tuple[jax.Array, dict]]:
    """(params, batch) -> (mean loss, mean gradient), laid out as the plan says; `unrolled`:
    the parameters of unrolled layers (`context.unrolled_layer_params`)."""
    manual = plan.batch_axes
    m = plan.microbatches

    def local_loss(params: dict, batch: Any) -> jax.Array:
        # parameters of the layers (stacked or unrolled) are gathered by `jaxpar.layer`,
        # the rest here
        params = by_path(params, plan.params, lambda i, x: x if "layers" in i.logical_axes
                          or i.path in unrolled else context.gather(x, plan.param_layout(i)))
        return loss_fn(context.merge(graphdef, params), batch)

    def replicated_over(info: ParamInfo) -> tuple[str, ...]:
        return tuple(a for a in manual if a not in sum(plan.param_layout(info), ()))

    def local_loss_and_grads(params: dict, batch: Any) -> tuple[jax.Array, dict]:
        """On one batch shard. Autodiff of the gathers emits the gradient reduce-scatters
        (per microbatch); the parameters replicated over manual axes are marked varying
        first, so their gradients are all-reduced once per step, after accumulation."""
        params = by_path(params, plan.params, lambda i, x: jax.lax.pcast(
            x, replicated_over(i), to="varying") if replicated_over(i) else x)
        if m == 1:
            loss, grads = jax.value_and_grad(local_loss)(params, batch)
        else:
            def body(carry, micro):
                result = jax.value_and_grad(local_loss)(params, micro)
                return jax.tree.map(jnp.add, carry, result), None

            micro = split_microbatches(batch, m)
            first = jax.value_and_grad(local_loss)(params, jax.tree.map(lambda x: x[0], micro))
            (loss, grads), _ = jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], micro))
        if manual:
            loss = jax.lax.pmean(loss, manual)
        grads = by_path(grads, plan.params, lambda i, g: jax.lax.psum(g, replicated_over(i))
                         if replicated_over(i) else g)
        scale = 1 / (m * plan.data_parallel_size)
        return loss / m, jax.tree.map(lambda g: g * scale, grads)

    if not manual:
        return local_loss_and_grads
    param_specs = by_path(params_shape, plan.params, lambda i, _: context.partition_spec(
        plan.param_layout(i), keep=lambda a: a in manual))
    return jax.shard_map(
        local_loss_and_grads,
        mesh=mesh,
        in_specs=(param_specs, PartitionSpec(manual)),
        out_specs=(PartitionSpec(), param_specs),
        axis_names=set(manual),
    )


def parallelize_flat(model_fn: ModelFn, optimizer: optax.GradientTransformation,
                     loss_fn: LossFn, plan: Plan, batch: Any,
                     devices: Sequence[jax.Device]) -> Parallelized:
    """The step of a plan without a pipeline (see `jaxpar.parallelize`)."""
    graphdef, params_shape, infos = abstract_params(model_fn)
    plan = plan.check(infos, [leaf.shape[0] for leaf in jax.tree.leaves(batch)], len(devices))
    mesh = make_mesh(plan, devices)
    state_sharding, abstract_state = state_sharding_of(plan, mesh, optimizer, params_shape)
    batch_sharding = jax.tree.map(
        lambda _: NamedSharding(mesh, PartitionSpec(plan.batch_axes or None)), batch)
    gathers = any(a in plan.batch_axes for i in plan.params for axes in plan.param_layout(i)
                  for a in axes)
    unrolled = (context.unrolled_layer_params(graphdef, params_shape, loss_fn, batch, plan)
                if gathers else frozenset())
    local = _loss_and_grads(plan, mesh, graphdef, loss_fn, params_shape, unrolled)

    def loss_and_grads(params: dict, batch: Any) -> tuple[jax.Array, dict]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            with context.active(plan, plan.batch_axes, unrolled) as active:
                result = local(params, batch)
        require_layer(plan, active)
        return result

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads = loss_and_grads(state.params, batch)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return apply_gradients(optimizer, state, grads), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return Parallelized(
        plan=plan,
        mesh=mesh,
        state_sharding=state_sharding,
        abstract_state=abstract_state,
        init=jax.jit(functools.partial(init_state, model_fn, optimizer),
                     out_shardings=state_sharding),
        step=jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, replicated), donate_argnums=0),
        shard_batch=lambda batch: jax.device_put(batch, batch_sharding),
        params_of=lambda state: state.params,
        loss_and_grads=jax.jit(loss_and_grads),
    )
