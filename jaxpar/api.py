"""The two entry points: `parallelize` emits the step a Plan describes, in whatever form it
names; `auto_parallelize` traces the model, searches the plan and emits it, in one call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from jaxpar.cluster.calibration import calibrate
from jaxpar.emit.parallelized import Parallelized
from jaxpar.emit.pipeline import checked
from jaxpar.emit.spmd import parallelize_spmd
from jaxpar.emit.step import parallelize_flat
from jaxpar.host_memory import keep_freed_memory
from jaxpar.pipelining import FORMS
from jaxpar.plan import Plan, PlanError
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.cost import Options
from jaxpar.planners.pipeline.search import plan_pipeline
from jaxpar.planners.sharding.search import MAX_MICROBATCHES, plan_sharding
from jaxpar.runtime.driver import parallelize_mpmd, updates_chunks_alone
from jaxpar.tracing.graph import trace_graph
from jaxpar.tracing.params import LossFn, ModelFn, abstract_model, statistics
from jaxpar.tracing.stages import Pieces, Stages


def parallelize(
    model_fn: ModelFn,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn,
    plan: Plan,
    batch: Any,
    devices: Sequence[jax.Device] | None = None,
) -> Parallelized:
    """Lay out and jit a training step of `model_fn(rngs)` under `plan`.

    `batch` is an example batch (arrays or ShapeDtypeStructs, batch dimension first);
    every check on the plan runs here, before anything compiles. A plan with a `pipeline`
    needs `loss_fn` to be a `jaxpar.Stages`; its state is laid out per the plan's form
    (see `Parallelized`).
    """
    devices = list(jax.devices() if devices is None else devices)
    if devices[0].platform == "cpu":
        keep_freed_memory()
    if plan.pipeline is None:
        return parallelize_flat(model_fn, optimizer, loss_fn, plan, batch, devices)
    plan, pieces, chunk_layers, schedule = checked(model_fn, loss_fn, plan, batch, len(devices))
    build = parallelize_spmd if plan.pipeline.form == "spmd" else parallelize_mpmd
    return build(model_fn, optimizer, plan, pieces, chunk_layers, schedule, batch, devices)


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
    max_microbatches: int = MAX_MICROBATCHES,
    pipeline: bool = False,
) -> Parallelized:
    """The fastest plan that fits `memory_budget` (default: the devices' memory), laid out
    and jitted like `jaxpar.parallelize`. `cluster` defaults to `calibrate()` of the local
    devices (measured once, then cached); `plan.explain()` shows the runners-up.
    `max_microbatches` bounds the microbatches of every plan searched: the pieces each
    data-parallel replica's batch is cut into, run one after another without a pipeline and
    through the stages with one.

    With `pipeline=True` (the loss a `jaxpar.Stages`) pipelines are searched too
    (`planners.pipeline.search.plan_pipeline`, which prices each pipeline in both the MPMD
    and the SPMD form) and the fastest runs, in its form; either way `plan.explain()` says
    why pipelining won or lost. An optimizer whose update couples parameters across chunks
    (optax.clip_by_global_norm) rules the MPMD form out: it updates each chunk alone. A
    model whose forward pass updates statistics (batch norm) is planned without
    microbatches: they would see one microbatch at a time."""
    if max_microbatches < 1:
        raise ValueError(f"max_microbatches={max_microbatches}: allow at least 1")
    if pipeline and not isinstance(loss_fn, Stages):
        raise PlanError("pipeline=True needs the loss as a jaxpar.Stages (what runs before, in "
                        f"and after the layer stack); got {type(loss_fn).__name__}")
    devices = list(jax.devices() if devices is None else devices)
    cluster = cluster or calibrate(devices)
    if cluster.num_devices != len(devices):
        raise ValueError(f"the cluster has {cluster.num_devices} devices but {len(devices)} "
                         "are given; plan for the devices you run on")
    if statistics(abstract_model(model_fn)[3]):
        max_microbatches = 1  # they must see the whole batch (jaxpar.emit.variables)
    graph = trace_graph(model_fn, loss_fn, batch)
    params_shape = {p.path: jax.ShapeDtypeStruct(p.shape, p.dtype) for p in graph.params}
    options = Options(optimizer_slots=optimizer_slots(optimizer, params_shape))
    if pipeline:
        alone = updates_chunks_alone(optimizer, Pieces.of(model_fn, loss_fn))
        plan = plan_pipeline(graph, cluster, memory_budget, options,
                             max_microbatches=max_microbatches,
                             forms=FORMS if alone else ("spmd",))
    else:
        plan = plan_sharding(graph, cluster, memory_budget, options, max_microbatches)
    return parallelize(model_fn, optimizer, loss_fn, plan, batch, devices)
