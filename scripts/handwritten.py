"""The program a user would write by hand for a plan's layout: the benchmarks' peer.

Plain JAX and optax, no jaxpar emitter: a `jax.make_mesh` (automatic axes: GSPMD), every parameter a
`NamedSharding` of the plan's layout (optimizer state alike, through
`optax.tree_map_params`), the batch split over the plan's batch axes, one `jax.jit` with
in / out shardings and the state donated, `jax.value_and_grad` of the same loss (microbatches
accumulated by a `lax.scan`), the same `optax` update and metrics. The model is the same
NNX module; its `jaxpar.constrain` / `jaxpar.layer` hooks run as the plain
`with_sharding_constraint` and `jax.checkpoint` a user would write (jaxpar's context with no
manual axes: nothing is gathered by hand, GSPMD partitions everything).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxpar import context
from jaxpar.plan import Plan


def handwritten(model_fn: Callable[[nnx.Rngs], nnx.Module],
                optimizer: optax.GradientTransformation, loss_fn: Callable, plan: Plan,
                batch: Any) -> tuple[Callable, Callable, Callable]:
    """(init(key) -> state, step(state, batch) -> (state, metrics), shard_batch) for a plan
    without a pipeline whose parameter table is bound (`parallelize(...).plan`)."""
    mesh = jax.make_mesh(tuple(size for _, size in plan.mesh),
                         tuple(name for name, _ in plan.mesh),
                         axis_types=(AxisType.Auto,) * len(plan.mesh))
    table = {info.path: info for info in plan.params}

    def sharding(layout) -> NamedSharding:
        return NamedSharding(mesh, PartitionSpec(*(axes or None for axes in layout)))

    def shardings(params: Any, layout_of: Callable) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: sharding(layout_of(table["/".join(str(k.key) for k in path)])),
            params)

    def fresh(key: jax.Array) -> tuple[Any, Any]:
        with nnx.use_eager_sharding(False):
            model = model_fn(nnx.Rngs(key))
        return nnx.split(model, nnx.Param)[:2]

    graphdef, abstract = jax.eval_shape(fresh, jax.random.key(0))
    abstract = abstract.to_pure_dict()
    param_sharding = shardings(abstract, plan.param_layout)
    opt_sharding = optax.tree_map_params(
        optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, abstract),
        shardings(abstract, plan.optimizer_layout),
        transform_non_params=lambda _: sharding(()))
    state_sharding = (sharding(()), param_sharding, opt_sharding)
    batch_sharding = jax.tree.map(
        lambda _: NamedSharding(mesh, PartitionSpec(plan.batch_axes or None)), batch)

    def init(key: jax.Array) -> tuple:
        params = fresh(key)[1].to_pure_dict()
        return jnp.zeros((), jnp.int32), params, optimizer.init(params)

    def loss(params: dict, batch: Any) -> jax.Array:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), context.active(plan, ()):
            return loss_fn(nnx.merge(graphdef, nnx.State(params)), batch)

    def step(state: tuple, batch: Any) -> tuple[tuple, dict]:
        count, params, opt_state = state
        m = plan.microbatches
        if m == 1:
            value, grads = jax.value_and_grad(loss)(params, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)

            def accumulate(carry, one):
                return jax.tree.map(jnp.add, carry, jax.value_and_grad(loss)(params, one)), None

            zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
            (value, grads), _ = jax.lax.scan(accumulate, zero, micro)
            value, grads = value / m, jax.tree.map(lambda g: g / m, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
        return (count + 1, optax.apply_updates(params, updates), opt_state), metrics

    return (jax.jit(init, out_shardings=state_sharding),
            jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                    out_shardings=(state_sharding, sharding(())), donate_argnums=0),
            lambda host: jax.device_put(host, batch_sharding))
