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
from jaxpar.emit.variables import after_step, for_shard, sync_batch_norms
from jaxpar.emit.variables import check as check_variables
from jaxpar.emit.variables import of_model as variables_of
from jaxpar.plan import ParamInfo, Plan, PlanError
from jaxpar.tracing.loss import LossProbe, loss_output, probe_loss
from jaxpar.tracing.params import LossFn, ModelFn, abstract_model


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
                    params_shape: dict, probe: LossProbe) -> Callable:
    """(params, variables, batch) -> ((mean loss, (mean aux, variables)), mean gradient),
    laid out as the plan says; aux is {} for a loss without one (see `jaxpar.tracing.loss`),
    variables are the model's others, updated (see `jaxpar.emit.variables`)."""
    manual = plan.batch_axes
    m = plan.microbatches

    def local_loss(params: dict, variables: dict, batch: Any) -> tuple[jax.Array, Any]:
        # parameters of the layers (stacked or unrolled) are gathered by `jaxpar.layer`,
        # the rest here
        params = by_path(params, plan.params, lambda i, x: x if "layers" in i.logical_axes
                          or i.path in probe.unrolled
                          else context.gather(x, plan.param_layout(i)))
        model = context.merge(graphdef, params, variables)
        sync_batch_norms(model, manual)
        loss, aux = loss_output(loss_fn(model, batch))
        updated = variables_of(model, variables)
        return loss, ({} if aux is None else aux, updated)

    value_and_grad = jax.value_and_grad(local_loss, has_aux=True)

    def replicated_over(info: ParamInfo) -> tuple[str, ...]:
        return tuple(a for a in manual if a not in sum(plan.param_layout(info), ()))

    def local_loss_and_grads(params: dict, variables: dict, batch: Any) -> tuple:
        """On one batch shard. Autodiff of the gathers emits the gradient reduce-scatters
        (per microbatch); the parameters replicated over manual axes are marked varying
        first, so their gradients are all-reduced once per step, after accumulation. Every
        microbatch starts from the step's variables; the last one's are returned."""
        params = by_path(params, plan.params, lambda i, x: jax.lax.pcast(
            x, replicated_over(i), to="varying") if replicated_over(i) else x)
        rows = jax.tree.leaves(batch)[0].shape[0]
        shard = jax.lax.axis_index(manual) if manual else 0

        def run(micro: Any, j: Any) -> tuple:
            """Microbatch j: rows j, j + m, ... of this shard's."""
            return value_and_grad(params, for_shard(variables, shard * rows + j, m, rows // m),
                                  micro)

        if m == 1:
            (loss, (aux, updated)), grads = run(batch, 0)
        else:
            def body(carry, xs):
                (loss, (aux, _)), grads = carry
                (loss_j, (aux_j, updated)), grads_j = run(*xs)
                total = jax.tree.map(jnp.add, (loss, aux, grads), (loss_j, aux_j, grads_j))
                return ((total[0], (total[1], updated)), total[2]), None

            micro = split_microbatches(batch, m)
            first = run(jax.tree.map(lambda x: x[0], micro), 0)
            rest = (jax.tree.map(lambda x: x[1:], micro), jnp.arange(1, m))
            ((loss, (aux, updated)), grads), _ = jax.lax.scan(body, first, rest)
        if manual:
            loss, aux = jax.lax.pmean((loss, aux), manual)
        grads = by_path(grads, plan.params, lambda i, g: jax.lax.psum(g, replicated_over(i))
                         if replicated_over(i) else g)
        scale = 1 / (m * plan.data_parallel_size)
        return ((loss / m, (jax.tree.map(lambda a: a / m, aux),
                            after_step(updated, variables, manual))),
                jax.tree.map(lambda g: g * scale, grads))

    if not manual:
        return local_loss_and_grads
    param_specs = by_path(params_shape, plan.params, lambda i, _: context.partition_spec(
        plan.param_layout(i), keep=lambda a: a in manual))
    return jax.shard_map(
        local_loss_and_grads,
        mesh=mesh,
        in_specs=(param_specs, PartitionSpec(), PartitionSpec(manual)),
        out_specs=((PartitionSpec(), (PartitionSpec(), PartitionSpec())), param_specs),
        axis_names=set(manual),
    )


def parallelize_flat(model_fn: ModelFn, optimizer: optax.GradientTransformation,
                     loss_fn: LossFn, plan: Plan, batch: Any,
                     devices: Sequence[jax.Device]) -> Parallelized:
    """The step of a plan without a pipeline (see `jaxpar.parallelize`)."""
    graphdef, params_shape, infos, variables = abstract_model(model_fn)
    plan = plan.check(infos, [leaf.shape[0] for leaf in jax.tree.leaves(batch)], len(devices))
    check_variables(plan, variables, jax.tree.leaves(batch)[0].shape[0])
    variables_shape = variables.to_pure_dict()
    probe = probe_loss(graphdef, params_shape, loss_fn, batch, plan, variables_shape)
    mesh = make_mesh(plan, devices)
    state_sharding, abstract_state = state_sharding_of(plan, mesh, optimizer, params_shape,
                                                       variables_shape)
    batch_sharding = jax.tree.map(
        lambda _: NamedSharding(mesh, PartitionSpec(plan.batch_axes or None)), batch)
    local = _loss_and_grads(plan, mesh, graphdef, loss_fn, params_shape, probe)

    def run(params: dict, variables: dict, batch: Any) -> tuple:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            with context.active(plan, plan.batch_axes, probe.unrolled) as active:
                result = local(params, variables, batch)
        require_layer(plan, active)
        return result

    def loss_and_grads(params: dict, batch: Any, variables: dict | None = None
                       ) -> tuple[jax.Array, dict]:
        if variables is None and variables_shape:
            raise PlanError("the model has variables besides its parameters: pass "
                            "variables=state.variables")
        (loss, _), grads = run(params, variables or {}, batch)
        return loss, grads

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, (aux, variables)), grads = run(state.params, state.variables, batch)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if probe.has_aux:
            metrics["aux"] = aux
        return apply_gradients(optimizer, state, grads, variables), metrics

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
