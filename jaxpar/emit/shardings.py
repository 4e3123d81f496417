"""Where a plan puts things: its device mesh, and the shardings of the train state and batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxpar import context
from jaxpar.emit.state import TrainState
from jaxpar.plan import ParamInfo, Plan
from jaxpar.tracing.params import path_str


def make_mesh(plan: Plan, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The plan's mesh over `devices` (default: all), the last axis varying fastest, so it
    stays within a node."""
    devices = list(jax.devices() if devices is None else devices)
    plan.check_devices(len(devices))
    shape = tuple(size for _, size in plan.mesh)
    names = tuple(name for name, _ in plan.mesh)
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def by_path(params: dict, infos: Sequence[ParamInfo], fn: Callable[[ParamInfo, Any], Any]):
    """Map `fn(info, leaf)` over a parameter pytree."""
    table = {info.path: info for info in infos}
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(table[path_str(p)], x), params)


def state_sharding_of(plan: Plan, mesh: Mesh, optimizer: optax.GradientTransformation,
                      params_shape: dict, variables_shape: dict | None = None
                      ) -> tuple[TrainState, TrainState]:
    """Shardings of the train state and its abstract value (ShapeDtypeStructs). The
    variables (batch statistics, RNG streams) are replicated: every device holds them."""
    def sharding(layout):
        return NamedSharding(mesh, context.partition_spec(layout))

    param_shardings = by_path(params_shape, plan.params,
                              lambda i, _: sharding(plan.param_layout(i)))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shape = jax.eval_shape(optimizer.init, params_shape)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, s: s,
        opt_shape,
        by_path(params_shape, plan.params, lambda i, _: sharding(plan.optimizer_layout(i))),
        transform_non_params=lambda _: replicated,
    )
    variables_shape = variables_shape or {}
    state_sharding = TrainState(replicated, param_shardings, opt_shardings,
                                jax.tree.map(lambda _: replicated, variables_shape))
    return state_sharding, abstract_state(params_shape, opt_shape, state_sharding,
                                          variables_shape)


def abstract_state(params_shape: dict, opt_shape: Any, sharding: TrainState,
                   variables_shape: dict | None = None) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(jax.ShapeDtypeStruct((), jnp.int32), params_shape, opt_shape,
                   variables_shape or {}), sharding)
