"""What a pipeline's pieces cost: one microbatch of a piece (`piece_cost`), a rank's memory
and stash, a lower bound on the step, and the cached `Pricer` the search calls."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jaxpar.plan import Plan
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.cost import Options, Terms, activation_bytes, group_terms, is_stacked
from jaxpar.planners.graph import Group, ModelGraph
from jaxpar.planners.pipeline.parts import rescale, stage_parts, subcluster
from jaxpar.planners.schedules.generators import Op


@dataclasses.dataclass(frozen=True)
class Cost:
    """A stage piece's per-microbatch times (forward f, input-gradient backward b, weight
    gradient w), its once-per-step gradient sync, and its per-device bytes: params, grads,
    optimizer, the backward working set (temporary), the activations stashed per in-flight
    microbatch, and (remat) the recomputed rest zero-bubble holds from B to W (extra).
    Fields may be numpy arrays: the DP prices every layer range at once."""

    f: float = 0.0
    b: float = 0.0
    w: float = 0.0
    sync: float = 0.0
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    temporary: float = 0.0
    stash: float = 0.0
    extra: float = 0.0

    @property
    def time(self) -> float:
        return self.f + self.b + self.w

    def __add__(self, other: Cost) -> Cost:
        """Pieces side by side: everything adds but the working set, which is a maximum."""
        summed = {k.name: getattr(self, k.name) + getattr(other, k.name)
                  for k in dataclasses.fields(self)}
        return Cost(**{**summed, "temporary": np.maximum(self.temporary, other.temporary)})

    def __mul__(self, k) -> Cost:
        """`k` copies in a row (the working set stays one copy's)."""
        return Cost(**{f.name: getattr(self, f.name) * (1 if f.name == "temporary" else k)
                       for f in dataclasses.fields(self)})

    __rmul__ = __mul__


def sync_time(group: Group, plan: Plan, cluster: Cluster) -> float:
    """The once-per-step gradient collectives `cost.group_terms` books for `group`: the
    all-reduce over the data axes a parameter is replicated on, ZeRO-1's update gather."""
    t = Terms()
    for p in group.params:
        lay = sum(plan.param_layout(p), ())
        shard = p.nbytes / math.prod(plan.mesh_shape[a] for a in lay)
        t.collective(cluster, plan, "all-reduce", tuple(a for a in plan.batch_axes
                                                        if a not in lay), shard)
        extra = tuple(a for a in sum(plan.optimizer_layout(p), ()) if a not in lay)
        t.collective(cluster, plan, "all-gather", extra, shard)
    return t.communication_s


def piece_cost(group: Group, plan: Plan, cluster: Cluster, options: Options,
               sync: float) -> Cost:
    """One microbatch of `group` (already rescaled to it) under `plan`, given its `sync_time`
    (which does not depend on the batch, so callers compute it once per plan).

    busy = compute + communication - sync, split by passes of forward work: f = busy / P,
    w = busy / P (the weight-gradient matmuls), b = the rest, with P = 3, or 4 when the layer
    is recomputed (remat "full"; a policy applies to stacked groups, as in `group_terms`);
    a policy that saves less than every intermediate makes B recompute the rest, which
    zero-bubble holds until W (`extra`). w also streams the
    microbatch's weight gradient and adds it into the sum (`Terms.microbatch_memory_s`,
    which the data axes and ZeRO level do not change); the once-per-step optimizer update's
    share of `Terms.memory_s` is not in a piece.
    """
    t = group_terms(group, dataclasses.replace(plan, microbatches=1), cluster, options)
    remat = plan.remat if is_stacked(group) else "none"
    passes = 4 if remat == "full" else 3
    busy = t.compute_s + t.communication_s - sync
    stash = t.memory["activations"]
    extra = 0.0 if remat == "none" else group.repeat * activation_bytes(group.saved, plan) - stash
    return Cost(busy / passes, busy * (passes - 2) / passes,
                busy / passes + t.microbatch_memory_s, sync, t.memory["params"],
                t.memory["grads"], t.memory["optimizer"], t.temporary, stash, extra)


def rank_memory(rank: Cost, live: float, batch: float, reserve: float) -> dict[str, float]:
    """Per-device bytes of a rank holding `rank` (its chunks summed) with `live` bytes of
    stashed activations at its peak; as `cost.predict`, the temporaries are the larger of the
    backward working set and a parameter-sized update buffer."""
    return {"params": rank.params, "grads": rank.grads, "optimizer": rank.optimizer,
            "activations": live, "temporaries": np.maximum(rank.temporary, rank.params)
            + reserve, "batch": batch}


def live_bytes(ops: Sequence[Op], stash: Sequence[float], extra: Sequence[float],
               split_backward: bool) -> float:
    """Peak stashed bytes on a rank running `ops`: + stash[c] at F, released at B (at W when
    the backward is split, which holds extra[c] more from B to W)."""
    live = peak = 0.0
    for op in ops:
        if op.kind == "F":
            live += stash[op.chunk]
        elif op.kind == "B":
            live += extra[op.chunk] if split_backward else -stash[op.chunk]
        else:
            live -= stash[op.chunk] + extra[op.chunk]
        peak = max(peak, live)
    return peak


def pipeline_bound(chunks: Sequence[Cost], name: str, p: int, m: int, v: int,
                   p2p: float) -> float:
    """A lower bound on the simulated step of `name` with these per-chunk times.

    Rank r starts after the first pass of chunks < r (sum F + r hops), runs m times its work,
    and its last B still travels down chunks < r (sum B + r hops). ZB-H1's rank r runs r + 1
    W's after its last B, which hide that tail up to (r + 1) W_r, and rank 0 ends with a W:
    tail = max(0, sum B + r hops + W_0 - (r + 1) W_r). Equal chunks, no p2p: (m + p - 1) t,
    Megatron's m t + (p - 1) t / v, and ZB-H1's m (F + B + W) + (p - 1)(F + B - W).
    """
    split = name == "zero_bubble_h1"
    best = 0.0
    for r in range(p):
        before = chunks[:r]
        start = sum(c.f for c in before) + r * p2p
        work = m * sum(chunks[c].time for c in range(r, p * v, p))
        down = sum(c.b + (0 if split else c.w) for c in before) + r * p2p
        tail = max(0.0, down + chunks[0].w - (r + 1) * chunks[r].w) if split else down
        best = max(best, start + work + tail)
    return best


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A pipeline to price: p stages of `stage_plan`, v chunks per rank, m microbatches of
    `microbatch_size` per replica, run by `schedule`."""

    p: int
    v: int
    m: int
    schedule: str
    microbatch_size: int
    stage_plan: Plan

    @property
    def name(self) -> str:
        """'pp8 v2 interleaved_1f1b m64 b1 x dp6+tp8 remat'."""
        chunks = f" v{self.v}" if self.v > 1 else ""
        return (f"pp{self.p}{chunks} {self.schedule} m{self.m} b{self.microbatch_size} x "
                f"{self.stage_plan.name}")


@dataclasses.dataclass(frozen=True)
class PieceCosts:
    """What the pieces of a pipeline cost under one intra-stage plan and microbatch size."""

    layer: Cost
    first: Cost
    last: Cost
    p2p: float
    tied_sync: float
    batch: float
    reserve: float


class Pricer:
    """Prices a pipeline's pieces under (intra-stage plan, microbatch size): the one place the
    cost model is called, cached.

    A microbatch's time, stash and working set depend on the fsdp x tensor part of the stage
    mesh and the per-replica microbatch, not on the data-parallel degree (that only splits
    the batch, and all its collectives are the per-step sync): they are priced once on the
    mesh 1 x fsdp x tensor, shared by every p. The sync and the optimizer state (ZeRO-1
    splits it over `data`) are priced per stage mesh, once for all microbatch sizes.
    """

    def __init__(self, graph: ModelGraph, cluster: Cluster, options: Options):
        self.graph, self.cluster, self.options = graph, cluster, options
        self.parts = stage_parts(graph)
        self._models: dict[tuple, PieceCosts] = {}
        self._microbatch: dict[tuple, Cost] = {}
        self._step: dict[tuple, tuple[float, float]] = {}

    def model(self, p: int, plan: Plan, microbatch_size: int) -> PieceCosts:
        key = (p, plan.mesh, plan.zero, plan.remat, microbatch_size)
        if key not in self._models:
            self._models[key] = self._price(p, plan, microbatch_size)
        return self._models[key]

    def _price(self, p: int, plan: Plan, microbatch_size: int) -> PieceCosts:
        parts, n = self.parts, plan.num_devices
        pieces = [self._piece(i, g, plan, microbatch_size)
                  for i, g in enumerate(parts.first + (parts.layer,) + parts.last)]
        first = sum(pieces[:len(parts.first)], Cost())
        last = sum(pieces[len(parts.first) + 1:], Cost())
        layer = rescale(parts.layer, microbatch_size * plan.data_parallel_size
                        / self.graph.batch_size)
        bandwidth, latency = self.cluster.link(2, n)
        p2p = latency + activation_bytes(layer.saved_remat, plan) / bandwidth
        tied = sum(prm.nbytes / math.prod(plan.mesh_shape[a] for a in
                                          sum(plan.param_layout(prm), ()))
                   for g in parts.last for prm in g.params if prm.path in parts.tied)
        bandwidth, latency = self.cluster.link(2, (p - 1) * n)
        tied_sync = latency + tied / bandwidth if tied and p > 1 else 0.0  # 2(2 - 1) / 2 = 1
        return PieceCosts(pieces[len(parts.first)], first, last, p2p, tied_sync,
                      self.graph.batch_bytes / plan.data_parallel_size,
                      self.options.reserve_bytes)

    def _piece(self, index: int, group: Group, plan: Plan, microbatch_size: int) -> Cost:
        # one microbatch runs on one data-parallel replica: the mesh without `data`
        inner = dataclasses.replace(plan, mesh=tuple((a, s) for a, s in plan.mesh if a != "data"),
                                    zero=0)
        key = (index, inner.mesh, plan.remat, microbatch_size)
        if key not in self._microbatch:
            sub = subcluster(self.cluster, inner.num_devices)
            factor = microbatch_size * inner.data_parallel_size / self.graph.batch_size
            self._microbatch[key] = piece_cost(rescale(group, factor), inner, sub,
                                               self.options, sync_time(group, inner, sub))
        step = (index, plan.mesh, plan.zero)
        if step not in self._step:
            sub = subcluster(self.cluster, plan.num_devices)
            state = dataclasses.replace(group, matmuls=(), flops_fwd=0.0, saved=(),
                                        saved_remat=(), saved_dots=())
            self._step[step] = (sync_time(group, plan, sub),
                                group_terms(state, plan, sub, self.options).memory["optimizer"])
        sync, optimizer = self._step[step]
        return dataclasses.replace(self._microbatch[key], sync=sync, optimizer=optimizer)


def proxy_memory(layers: Cost, extras: Cost, v: int, stashed: int, held: int,
                  model: PieceCosts) -> dict[str, float]:
    """A chunk's rank memory as if the rank's other v - 1 chunks had the same layers (exact
    for v = 1): rank = v layers + extras, live = (stashed stash + held extra) / v."""
    rank = v * layers + extras
    live = (stashed * rank.stash + held * rank.extra) / v
    return rank_memory(rank, live, model.batch, model.reserve)


def extras_of(model: PieceCosts, chunk: int, chunks: int) -> Cost:
    """What chunk `chunk` of `chunks` adds to its layers: the first and / or last groups."""
    extras = Cost()
    if chunk == 0:
        extras = extras + model.first
    if chunk == chunks - 1:
        extras = extras + model.last
    return extras


def chunk_costs(model: PieceCosts, bounds: Sequence[tuple[int, int]]) -> list[Cost]:
    return [model.layer * (j - i) + extras_of(model, c, len(bounds))
            for c, (i, j) in enumerate(bounds)]


def step_sync(model: PieceCosts, costs: Sequence[Cost], p: int) -> float:
    """Gradient sync after the flush: the slowest rank's, then the tied embedding's."""
    return max(sum(c.sync for c in costs[r::p]) for r in range(p)) + model.tied_sync
