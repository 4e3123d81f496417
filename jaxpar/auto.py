"""auto_parallelize: trace the model, search the plan, emit the step; one call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from jaxpar.calibration import calibrate
from jaxpar.emit import LossFn, Parallelized, parallelize
from jaxpar.graph import trace_graph
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.cost import Options
from jaxpar.planners.search import plan_sharding
from jaxpar.trace import ModelFn


def optimizer_slots(optimizer: optax.GradientTransformation, params_shape: Any) -> float:
    """Optimizer-state bytes per parameter byte (Adam: 2), read from its abstract state."""
    def nbytes(tree) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return nbytes(jax.eval_shape(optimizer.init, params_shape)) / max(nbytes(params_shape), 1)


def auto_parallelize(
    model_fn: ModelFn,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn,
    batch: Any,
    cluster: Cluster | None = None,
    memory_budget: float | None = None,
    devices: Sequence[jax.Device] | None = None,
    max_microbatches: int = 16,
) -> Parallelized:
    """The fastest plan that fits `memory_budget` (default: the devices' memory), laid out
    and jitted like `jaxpar.parallelize`. `cluster` defaults to `calibrate()` of the local
    devices (measured once, then cached); `plan.explain()` shows the runners-up."""
    devices = list(jax.devices() if devices is None else devices)
    cluster = cluster or calibrate(devices)
    if cluster.num_devices != len(devices):
        raise ValueError(f"the cluster has {cluster.num_devices} devices but {len(devices)} "
                         "are given; plan for the devices you run on")
    graph = trace_graph(model_fn, loss_fn, batch)
    params_shape = {p.path: jax.ShapeDtypeStruct(p.shape, p.dtype) for p in graph.params}
    options = Options(optimizer_slots=optimizer_slots(optimizer, params_shape))
    plan = plan_sharding(graph, cluster, memory_budget, options, max_microbatches)
    return parallelize(model_fn, optimizer, loss_fn, plan, batch, devices)
