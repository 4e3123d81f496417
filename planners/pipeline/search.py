"""Pipeline planner: stages, schedule, microbatches and intra-stage sharding, chosen jointly.

A pipeline of p stages runs on p submeshes of n = N / p devices; stages are outer in device
order, so consecutive stages are n devices apart. The layer stack (the graph's one group with
repeat > 1) is cut into p * v contiguous chunks; chunk c runs on rank c mod p (v > 1:
interleaved 1F1B). The groups before the stack join the first chunk, the groups after it the
last. A tied embedding's output matmul (the graph books the logits under `embed`) moves to
the last chunk with the activations the loss saves, so the embedding table is held by both the
first and the last stage, as in Megatron-LM, and its gradient is all-reduced between them
once per step.

Each candidate fixes the intra-stage plan (mesh data x fsdp x tensor of n devices, ZeRO level,
remat) and the microbatch size b per replica, so m = batch / (b * data * fsdp). The cost
model (`cost.group_terms`, called with microbatches=1 on the graph rescaled to one
microbatch) gives a layer's forward / backward time and its memory; the cut is Alpa's
inter-operator DP minimising the bottleneck chunk time under each rank's memory (params,
grads, optimizer, stashed activations of the schedule's in-flight microbatches); the step is
the simulator's (`simulator.simulate`) plus the once-per-step gradient sync.

Search space: p dividing N (2 <= p <= layers, stages of whole nodes or inside one node); the
stage mesh data x fsdp x tensor with fsdp x tensor inside a node; ZeRO 0 / 1 and the remat
policies (none, dots, full), the first of these variants (fastest first) under which a
schedule fits; b a power of two up to 8; GPipe, 1F1B, ZB-H1, and interleaved 1F1B with
every v the layers allow. Pruned in three rounds:
(1) every candidate gets an O(1) estimate from the homogeneous-layer bottleneck; (2) the best
by estimate get the exact DP cut and the schedule's lower bound on its step
(`pipeline_bound`); (3) the best by bound are simulated until the next bound cannot beat the
best simulated step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

from jaxpar.named import named_plan
from jaxpar.pipelining import FORMS, SCHEDULES
from jaxpar.plan import REMAT, Alternative, Plan, PlanError
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.cost import Options
from jaxpar.planners.graph import ModelGraph
from jaxpar.planners.pipeline.cost import (
    Candidate,
    PieceCosts,
    Pricer,
    chunk_costs,
    pipeline_bound,
    proxy_memory,
    step_sync,
)
from jaxpar.planners.pipeline.cut import cut_stack, estimate_step
from jaxpar.planners.pipeline.result import PricedPipeline, finish, spmd_stage
from jaxpar.planners.schedules.generators import (
    check_schedule,
    in_flight,
    make_schedule,
    schedule_allows,
)
from jaxpar.planners.sharding.search import (
    MAX_MICROBATCHES,
    describe,
    divisors,
    mesh_shapes,
    plan_sharding,
)
from jaxpar.planners.units import format_bytes


def evaluate_pipeline(graph: ModelGraph, cluster: Cluster, *, p: int, v: int = 1, m: int,
                      schedule: str = "1f1b", mesh: str, zero: int = 0, remat: str = "full",
                      memory_budget: float | None = None,
                      options: Options | None = None) -> Plan:
    """A given pipeline (e.g. a paper's own choice) as a Plan priced by the planner's model,
    in the faster form that fits: p stages of the named intra-stage plan `mesh` ("dp6+tp8")
    over N / p devices, v chunks per rank, m microbatches (defaults as Megatron-LM ran in
    2021: remat on, no ZeRO); the layers cut by the same DP. Raises ValueError / PlanError
    with the numbers when p does not divide the devices, the layers do not cover p v chunks,
    the schedule refuses m, or no cut fits the memory budget."""
    options = options or Options()
    budget = cluster.memory_bytes if memory_budget is None else memory_budget
    n_dev = cluster.num_devices
    if p < 1 or n_dev % p:
        raise ValueError(f"p={p} stages do not divide {n_dev} devices; use a divisor of "
                         f"{n_dev}")
    pricer = Pricer(graph, cluster, options)
    layers = pricer.parts.layers
    if p * v > layers:
        raise ValueError(f"{layers} layers cannot be cut into p * v = {p} * {v} = {p * v} "
                         f"chunks of at least one layer; use p * v <= {layers}")
    check_schedule(schedule, v)
    if not schedule_allows(schedule, p, m, v):
        make_schedule(schedule, p, m, v)  # raises the generator's own error
    stage = dataclasses.replace(named_plan(mesh, n_dev // p), zero=zero, remat=remat)
    stage = dataclasses.replace(stage, name=describe(stage))
    for info in graph.params:
        stage.check_param(info)
    replicas = stage.data_parallel_size
    per_replica, rest = divmod(graph.batch_size, replicas)
    if rest or per_replica % m:
        fix = ("choose a stage mesh whose data x fsdp divides it" if rest else
               f"choose m dividing {per_replica}")
        raise PlanError(f"batch {graph.batch_size} does not split into {replicas} replicas x "
                        f"m={m} microbatches; {fix}")
    cfg = Candidate(p, v, m, schedule, per_replica // m, stage)
    model = pricer.model(p, stage, cfg.microbatch_size)
    bounds = cut_stack(model, cfg, layers, budget)
    if bounds is None:
        raise PlanError(_no_fit(model, cfg, layers, budget))
    plan = finish(pricer, cfg, model, bounds, budget)
    if plan.memory_bytes > budget:
        raise PlanError(f"{plan.name}: the cut needs {format_bytes(plan.memory_bytes)} on its "
                        f"largest rank; the budget is {format_bytes(budget)}; use remat, more "
                        f"stages or smaller microbatches")
    return plan.to_plan(source="analytic, fixed configuration")


def _no_fit(model: PieceCosts, cfg: Candidate, layers: int, budget: float) -> str:
    """Why no cut fits: the balanced cut's first rank, by category, and what would shrink it."""
    chunks = cfg.p * cfg.v
    per = math.ceil(layers / chunks)
    stashed, held = in_flight(cfg.schedule, cfg.p, cfg.m, cfg.v)[0]
    memory = {k: float(x) for k, x in proxy_memory(model.layer * per, model.first, cfg.v,
                                                    stashed, held, model).items()}
    parts = ", ".join(f"{k} {format_bytes(x)}" for k, x in memory.items())
    stage = cfg.stage_plan
    fixes = [fix for fix, useful in (
        ("remat", stage.remat != "full"),
        ("ZeRO-1", not stage.zero and stage.axis_size("data") > 1),
        ("more stages", chunks < layers),
        ("smaller microbatches", cfg.microbatch_size > 1),
        ("more tensor parallelism", stage.axis_size("tensor") < stage.num_devices)) if useful]
    return (f"no cut of {layers} layers into {chunks} chunks fits {format_bytes(budget)} per "
            f"device with {stage.name} stages, {cfg.schedule} m={cfg.m}: rank 0 with "
            f"{per}-layer chunks and {stashed} microbatch chunks stashed needs "
            f"{format_bytes(sum(memory.values()))} ({parts}); try "
            f"{', '.join(fixes) or 'more devices'}")


def _stage_meshes(graph: ModelGraph, cluster: Cluster, devices: int) -> list[Plan]:
    """Intra-stage meshes of `devices` devices (the sharding search's `mesh_shapes`) whose
    axes but `data` fit inside one node (a stage re-gathers fsdp shards every microbatch: over
    the NIC that never pays), that lay out every parameter."""
    meshes = []
    for shape in mesh_shapes(devices):
        plan = Plan(mesh=shape)
        if cluster.devices_per_node % (plan.num_devices // plan.axis_size("data")):
            continue
        try:
            for info in graph.params:
                plan.check_param(info)
        except PlanError:
            continue
        meshes.append(plan)
    return meshes


def _variants(mesh: Plan) -> list[Plan]:
    """The mesh's ZeRO / remat variants, fastest first: each later one only saves memory
    (ZeRO-1 adds an update all-gather, "dots" elementwise recomputation, "full" a forward
    pass)."""
    zeros = (0, 1) if mesh.axis_size("data") > 1 else (0,)
    plans = [dataclasses.replace(mesh, zero=z, remat=r) for r in REMAT for z in zeros]
    return [dataclasses.replace(plan, name=describe(plan)) for plan in plans]


def _candidates(pricer: Pricer, cluster: Cluster, budget: float, schedules: Sequence[str],
                virtual: Sequence[int] | None, max_microbatch_size: int,
                max_microbatches: int | None, forms: Sequence[str] = FORMS
                ) -> list[tuple[float, Candidate]]:
    """Every (p, stage plan, microbatch size b, schedule, v) with an estimate, best first:
    p divides the devices with whole-node or in-node stages, b a power of two, at most
    `max_microbatches` microbatches; interleaving takes every v >= 2 of `virtual` (None:
    every v the layers allow, p v <= layers); a schedule takes, for each of `forms`, the
    first ZeRO / remat variant under which it fits that the form runs (a slower variant
    that also fits could only win where memory, not time, shapes the cut)."""
    graph, layers = pricer.graph, pricer.parts.layers
    found = []
    for p in divisors(cluster.num_devices):
        n = cluster.num_devices // p
        if not 2 <= p <= layers or (n % cluster.devices_per_node and
                                    cluster.devices_per_node % n):
            continue
        for mesh in _stage_meshes(graph, cluster, n):
            replicas = mesh.data_parallel_size
            for b in (2**k for k in range(max_microbatch_size.bit_length())):
                if graph.batch_size % (b * replicas):
                    continue
                m = graph.batch_size // (b * replicas)
                if max_microbatches is not None and m > max_microbatches:
                    continue
                interleave = range(2, layers // p + 1) if virtual is None else virtual
                allowed = {(name, v) for name in schedules
                           for v in (interleave if name == "interleaved_1f1b" else (1,))
                           if (v > 1 or name != "interleaved_1f1b") and p * v <= layers
                           and schedule_allows(name, p, m, v)}
                open_ = {form: set(allowed) for form in forms}  # no variant fits yet
                for stage in _variants(mesh):
                    runs = [f for f in open_ if f == "mpmd" or spmd_stage(stage) is not None]
                    if not any(open_.values()):
                        break
                    model = pricer.model(p, stage, b)
                    for name, v in sorted(set().union(*(open_[f] for f in runs))):
                        cfg = Candidate(p, v, m, name, b, stage)
                        estimate = estimate_step(model, cfg, layers, budget)
                        if estimate is not None:
                            found.append((estimate, cfg))
                            for f in runs:
                                open_[f].discard((name, v))
    found.sort(key=lambda x: x[0])
    return found


def plan_pipeline(graph: ModelGraph, cluster: Cluster, memory_budget: float | None = None,
                  options: Options | None = None, *, schedules: Sequence[str] = SCHEDULES,
                  virtual: Sequence[int] | None = None, max_microbatch_size: int = 8,
                  max_microbatches: int | None = None, cuts: int = 24,
                  simulated_ops: int = 300_000, alternatives: int = 8,
                  forms: Sequence[str] = FORMS) -> Plan:
    """The fastest plan that fits `memory_budget` per device, pipelined or not: the best
    pipeline (in the faster of its two forms) against the best plan without one
    (`plan_sharding` on the whole cluster); the loser leads the runners-up, so
    `explain()` says why pipelining won or lost. Pipelines run in one of `forms` only
    (`jaxpar.auto_parallelize` drops MPMD for an optimizer whose update couples chunks).

    Round 2 cuts the `cuts` best estimates (stopping past 1.25 x the best bound so far);
    round 3 simulates the cuts best bound first until the next bound cannot beat the best
    simulated step or `simulated_ops` F / B / W ops have been simulated (the first always is;
    the simulator takes some 10 us per op).
    """
    options = options or Options()
    budget = cluster.memory_bytes if memory_budget is None else memory_budget
    flat_microbatches = MAX_MICROBATCHES if max_microbatches is None else max_microbatches
    start = time.process_time()
    pricer = Pricer(graph, cluster, options)
    layers = pricer.parts.layers
    ranked = _candidates(pricer, cluster, budget, schedules, virtual, max_microbatch_size,
                         max_microbatches, forms)
    bounded: list[tuple[float, Candidate, tuple[tuple[int, int], ...]]] = []
    for estimate, cfg in ranked[:cuts]:
        if bounded and estimate > 1.25 * min(b for b, _, _ in bounded):
            break
        model = pricer.model(cfg.p, cfg.stage_plan, cfg.microbatch_size)
        cut = cut_stack(model, cfg, layers, budget)
        if cut is not None:
            costs = chunk_costs(model, cut)
            bounded.append((pipeline_bound(costs, cfg.schedule, cfg.p, cfg.m, cfg.v, model.p2p)
                            + step_sync(model, costs, cfg.p), cfg, cut))
    bounded.sort(key=lambda x: x[0])
    simulated: list[PricedPipeline] = []
    losers: list[tuple[str, float, float, str]] = []
    ops = 0
    for bound, cfg, cut in bounded:
        if (ops and ops >= simulated_ops) or \
                bound >= min((s.step_s for s in simulated), default=math.inf):
            losers.append((cfg.name, bound, math.nan, "lower bound"))
            continue
        plan = finish(pricer, cfg, pricer.model(cfg.p, cfg.stage_plan, cfg.microbatch_size),
                      cut, budget, forms)
        if plan is None:
            losers.append((cfg.name, bound, math.nan, f"no form of {', '.join(forms)} runs it"))
            continue
        ops += (3 if cfg.schedule == "zero_bubble_h1" else 2) * cfg.p * cfg.v * cfg.m
        if plan.memory_bytes > budget:
            losers.append((cfg.name, plan.step_s, plan.memory_bytes, f"needs "
                           f"{format_bytes(plan.memory_bytes)} > {format_bytes(budget)}"))
        else:
            simulated.append(plan)
    if not simulated:
        return _without_pipeline(graph, cluster, budget, options, flat_microbatches,
                                 _nothing_fits(pricer, cluster, budget))
    simulated.sort(key=lambda s: s.step_s)
    best = simulated[0]
    losers += [(s.name, s.step_s, s.memory_bytes, "simulated") for s in simulated[1:]]
    try:
        flat = plan_sharding(graph, cluster, budget, options, flat_microbatches,
                             suggest_devices=False)
    except PlanError as err:
        flat, flat_line = None, Alternative("no pipeline", math.nan, math.nan,
                                            str(err).split(";")[0])
    else:
        step = flat.predicted.step_s
        flat_line = Alternative(f"no pipeline: {flat.name}", step, flat.predicted.total_bytes,
                                f"{step / best.step_s - 1:+.1%} step time")
    if flat is not None and flat.predicted.step_s <= best.step_s:
        lost = Alternative(f"best pipeline: {best.name}", best.step_s, best.memory_bytes,
                           f"{best.step_s / flat.predicted.step_s - 1:+.1%} step time "
                           f"(bubble {best.bubble_fraction:.1%})")
        return dataclasses.replace(flat, alternatives=(lost,) + flat.alternatives)
    runners = [flat_line] + [
        Alternative(name, step, memory, how if how.startswith("needs") else
                    f"{step / best.step_s - 1:+.1%} step time ({how})")
        for name, step, memory, how in sorted(losers, key=lambda x: x[1])][:alternatives - 1]
    return best.to_plan(f"analytic: {len(ranked)} configurations estimated, {len(bounded)} "
                        f"cut, {len(simulated)} simulated in "
                        f"{time.process_time() - start:.2f} s", runners)


def _without_pipeline(graph: ModelGraph, cluster: Cluster, budget: float, options: Options,
                      max_microbatches: int, why: str) -> Plan:
    """The best plan without a pipeline when none fits (`why`); if that does not fit either,
    a PlanError with both reasons."""
    try:
        flat = plan_sharding(graph, cluster, budget, options, max_microbatches)
    except PlanError as err:
        raise PlanError(f"{why}. Without a pipeline: {err}") from None
    return dataclasses.replace(flat, alternatives=(
        Alternative("any pipeline", math.nan, math.nan, why),) + flat.alternatives)


def _nothing_fits(pricer: Pricer, cluster: Cluster, budget: float) -> str:
    """The leanest pipeline's shortfall: the most stages, the most tensor parallelism inside a
    node, ZeRO-1, remat, one sample per microbatch, 1F1B."""
    graph, layers = pricer.graph, pricer.parts.layers
    p = max((d for d in divisors(cluster.num_devices) if d <= layers and
             _stage_meshes(graph, cluster, cluster.num_devices // d)), default=None)
    if p is None:
        return (f"no pipeline of {cluster.num_devices} devices can lay out {layers} layers; "
                f"use a device count with a divisor p <= {layers} whose stages fit whole nodes")
    mesh = max(_stage_meshes(graph, cluster, cluster.num_devices // p),
               key=lambda plan: (plan.axis_size("tensor"), plan.axis_size("fsdp")))
    stage = _variants(mesh)[-1]
    m = graph.batch_size // stage.data_parallel_size
    cfg = Candidate(p, 1, m, "1f1b", 1, stage)
    return _no_fit(pricer.model(p, stage, 1), cfg, layers, budget) + " (the leanest pipeline)"
