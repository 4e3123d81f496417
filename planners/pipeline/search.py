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
stage mesh data x fsdp x tensor with fsdp x tensor inside a node; ZeRO 0 / 1 and remat off /
on, the first of these variants (fastest first) under which a schedule fits; b a power of two
up to 8; GPipe, 1F1B, ZB-H1, and interleaved 1F1B with v in {2, 4}. Pruned in three rounds:
(1) every candidate gets an O(1) estimate from the homogeneous-layer bottleneck; (2) the best
by estimate get the exact DP cut and the schedule's lower bound on its step
(`pipeline_bound`); (3) the best by bound are simulated until the next bound cannot beat the
best simulated step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxpar.plan import (
    SCHEDULES,
    Alternative,
    Pipeline,
    Plan,
    PlanError,
    Predicted,
    named_plan,
    runners_up,
)
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.cost import Options, Terms, activation_bytes, group_terms
from jaxpar.planners.graph import Group, ModelGraph, Tensor
from jaxpar.planners.schedules.generators import (
    Op,
    Schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zero_bubble_h1,
)
from jaxpar.planners.schedules.simulator import simulate
from jaxpar.planners.sharding.search import describe, divisors, plan_sharding

GiB = 2**30


# ------------------------------------------------------------------ the graph, cut for stages
def rescale(group: Group, factor: float) -> Group:
    """`group` at `factor` times the traced batch: FLOPs, matmul operand bytes and saved
    activations scale with the batch; parameters do not."""
    def tensor(t: Tensor) -> Tensor:
        shape = tuple(max(1, round(d * factor)) if a == "batch" else d
                      for d, a in zip(t.shape, t.logical_axes))
        return dataclasses.replace(t, shape=shape, nbytes=t.nbytes * factor)

    matmuls = tuple(dataclasses.replace(mm, flops=mm.flops * factor, out_bytes=mm.out_bytes
                                        * factor, in_bytes=mm.in_bytes * factor)
                    for mm in group.matmuls)
    return dataclasses.replace(group, matmuls=matmuls, flops_fwd=group.flops_fwd * factor,
                               saved=tuple(map(tensor, group.saved)),
                               saved_remat=tuple(map(tensor, group.saved_remat)))


def layer_slice(group: Group, layers: int) -> Group:
    """`layers` layers of a stacked group: its `layers`-axis parameters cut to that length
    (every other figure of a Group is already per layer)."""
    params = tuple(dataclasses.replace(p, shape=(layers,) + p.shape[1:])
                   if p.logical_axes[:1] == ("layers",) else p for p in group.params)
    return dataclasses.replace(group, repeat=layers, params=params)


@dataclasses.dataclass(frozen=True)
class StageParts:
    """A graph cut for pipelining: the groups the first stage adds to its layers, one layer of
    the stack and the stack's length, the groups the last stage adds, and the parameters
    both the first and the last stage hold (a tied embedding)."""

    first: tuple[Group, ...]
    layer: Group
    layers: int
    last: tuple[Group, ...]
    tied: tuple[str, ...]


def stage_parts(graph: ModelGraph) -> StageParts:
    """Groups before the stack go first, groups after it last; a matmul before the stack that
    keeps `vocab` is a tied output head and goes last with its group's saved activations
    (what the loss keeps; the embedding lookup's backward needs only the token ids)."""
    stacks = [i for i, g in enumerate(graph.groups) if g.repeat > 1]
    if len(stacks) != 1:
        names = [graph.groups[i].name for i in stacks]
        raise PlanError(f"pipelining cuts one stack of repeated layers; this graph has "
                        f"{len(stacks)} groups with repeat > 1 {names}: stack the layers on a "
                        f"`layers` axis (nnx.vmap + nnx.scan) to pipeline them")
    k = stacks[0]
    first, heads = [], []
    for g in graph.groups[:k]:
        head = tuple(mm for mm in g.matmuls if "vocab" in mm.free)
        if not head:
            first.append(g)
            continue
        flops = sum(mm.flops for mm in head)
        first.append(dataclasses.replace(
            g, matmuls=tuple(mm for mm in g.matmuls if "vocab" not in mm.free),
            flops_fwd=g.flops_fwd - flops, saved=(), saved_remat=()))
        heads.append(dataclasses.replace(g, matmuls=head, flops_fwd=flops))
    stack = graph.groups[k]
    return StageParts(tuple(first), layer_slice(stack, 1), stack.repeat,
                      graph.groups[k + 1:] + tuple(heads),
                      tuple(p.path for g in heads for p in g.params))


def subcluster(cluster: Cluster, devices: int) -> Cluster:
    """The cluster one stage of `devices` devices sees: whole nodes, or part of one node."""
    per_node = cluster.devices_per_node
    if devices % per_node and per_node % devices:
        raise PlanError(f"a stage of {devices} devices neither fills whole nodes nor fits in "
                        f"one node of {per_node}; choose a pipeline degree p with N / p a "
                        f"multiple or a divisor of {per_node}")
    return dataclasses.replace(cluster, num_nodes=max(1, devices // per_node),
                               devices_per_node=min(devices, per_node))


# ------------------------------------------------------------ per-microbatch cost of a piece
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
    is recomputed (remat applies to stacked groups, as in `group_terms`). w also streams the
    microbatch's weight gradient and adds it into the sum (`Terms.microbatch_memory_s`,
    which the data axes and ZeRO level do not change); the once-per-step optimizer update's
    share of `Terms.memory_s` is not in a piece.
    """
    t = group_terms(group, dataclasses.replace(plan, microbatches=1), cluster, options)
    remat = plan.remat and any(p.logical_axes[:1] == ("layers",) for p in group.params)
    passes = 4 if remat else 3
    busy = t.compute_s + t.communication_s - sync
    stash = t.memory["activations"]
    extra = group.repeat * activation_bytes(group.saved, plan) - stash if remat else 0.0
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


# ------------------------------------------------------------------------------ schedules
def check_schedule(name: str, v: int) -> None:
    """Raise ValueError unless `name` is a schedule that runs `v` chunks per rank."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if v < 1 or (v > 1 and name != "interleaved_1f1b"):
        raise ValueError(f"{name} runs one chunk per rank; v={v} virtual stages need "
                         f"interleaved_1f1b (v >= 1)")


def make_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """The named schedule's op lists; the generators raise ValueError on an m they refuse."""
    check_schedule(name, v)
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "zero_bubble_h1":
        return zero_bubble_h1(p, m)
    return interleaved_1f1b(p, m, v)


def schedule_allows(name: str, p: int, m: int, v: int) -> bool:
    """The generators' conditions on m, without building the schedule: interleaving needs
    m mod p = 0 (Megatron-LM), ZB-H1 m >= p."""
    if name == "interleaved_1f1b" and v > 1:
        return m % p == 0
    return name != "zero_bubble_h1" or m >= p


def in_flight(name: str, p: int, m: int, v: int) -> tuple[tuple[int, int], ...]:
    """Per rank r, the most (microbatch, chunk) activations stashed at once and the most held
    between B and W (zero-bubble only): GPipe m; 1F1B min(p - r, m); interleaved
    min(2 (p - r - 1) + (v - 1) p + 1, m v); ZB-H1 p stashed and min(r + 1, m) held."""
    if name == "gpipe":
        return ((m, 0),) * p
    if name == "zero_bubble_h1":
        return tuple((min(p, m), min(r + 1, m)) for r in range(p))
    if v == 1:
        return tuple((min(p - r, m), 0) for r in range(p))
    return tuple((min(2 * (p - r - 1) + (v - 1) * p + 1, m * v), 0) for r in range(p))


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


# -------------------------------------------------------------------------------- the cut
def cut_layers(times: Sequence[float], chunks: int, first: float = 0.0, last: float = 0.0,
               fits: Callable[[int], np.ndarray] | None = None
               ) -> tuple[tuple[tuple[int, int], ...], float] | None:
    """Cut layers 0..L-1 into `chunks` contiguous non-empty ranges minimising the bottleneck
    max_c time_c, time_c = sum(times[i:j]) + first [c = 0] + last [c = chunks - 1], where
    `fits(c)[i, j]` says whether layers i..j-1 may form chunk c (memory). Alpa's inter-op DP:

        best_c(j) = min_i max(best_{c-1}(i), time_c(i, j)),  best_{-1} = 0 at j = 0 only,

    over all (i, j) at once per chunk (numpy). Ties go to the cut whose later chunks are
    smallest. Returns the ranges and the bottleneck, or None if no cut fits.
    """
    n = len(times)
    if not 1 <= chunks <= n:
        raise ValueError(f"{n} layers cannot be cut into {chunks} chunks of at least one "
                         f"layer; use between 1 and {n} chunks")
    prefix = np.concatenate([[0.0], np.cumsum(times)])
    span = prefix[None, :] - prefix[:, None]
    index = np.arange(n + 1)
    nonempty = index[:, None] < index[None, :]
    best = np.where(index == 0, 0.0, np.inf)
    choices = []
    for c in range(chunks):
        allowed = nonempty if fits is None else nonempty & fits(c)
        extras = first * (c == 0) + last * (c == chunks - 1)
        candidate = np.where(allowed, np.maximum(best[:, None], span + extras), np.inf)
        best = candidate.min(axis=0)
        ties = candidate <= best * (1 + 1e-9) + 1e-300
        choices.append(n - np.argmax(ties[::-1], axis=0))
    if not np.isfinite(best[n]):
        return None
    bounds, j = [], n
    for c in reversed(range(chunks)):
        i = int(choices[c][j])
        bounds.append((i, j))
        j = i
    return tuple(reversed(bounds)), float(best[n])


# --------------------------------------------------------------------- the pipeline result
@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline rank: its chunks' layer ranges, the groups it holds, its per-device
    memory by category and its peak number of stashed (microbatch, chunk) activations."""

    rank: int
    chunks: tuple[tuple[int, int], ...]
    groups: tuple[str, ...]
    memory_bytes: dict[str, float]
    peak_stash: int

    @property
    def total_bytes(self) -> float:
        return sum(self.memory_bytes.values())


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """A pipeline: p stages of `stage_plan` (one intra-stage sharding for every stage; all
    stages run the same layer program), v chunks per rank, m microbatches of
    `microbatch_size` per replica, the schedule; per-chunk (F, B, W) seconds per microbatch,
    the p2p time per transfer, the simulated pipeline time and bubble, the gradient sync once
    per step; `flat` is the best plan without pipelining (None if none fits or nothing was
    searched). `stage_plan.microbatches` is 1: a stage program runs one microbatch at a time;
    m is the pipeline's."""

    p: int
    v: int
    m: int
    schedule: str
    microbatch_size: int
    stage_plan: Plan
    stages: tuple[Stage, ...]
    chunk_times: tuple[tuple[float, float, float], ...]
    p2p_s: float
    pipeline_s: float
    sync_s: float
    bubble_fraction: float
    flat: Plan | None = None
    alternatives: tuple[Alternative, ...] = ()
    source: str = ""

    @property
    def step_s(self) -> float:
        return self.pipeline_s + self.sync_s

    @property
    def num_devices(self) -> int:
        return self.p * self.stage_plan.num_devices

    @property
    def memory_bytes(self) -> float:
        """The largest rank's per-device bytes: what must fit the budget."""
        return max(s.total_bytes for s in self.stages)

    @property
    def pipelined(self) -> bool:
        """Whether this pipeline beats the best plan without one."""
        return self.flat is None or self.step_s < self.flat.predicted.step_s

    @property
    def name(self) -> str:
        """'pp8 v2 interleaved_1f1b m64 b1 x dp6+tp8 remat'."""
        return _Config(self.p, self.v, self.m, self.schedule, self.microbatch_size,
                       self.stage_plan).name

    def explain(self) -> str:
        """The pipeline, its prediction, why pipelining was or was not chosen, runners-up."""
        worst = max(self.stages, key=lambda s: s.total_bytes)
        lines = [f"Pipeline {self.name} ({self.p} stages of {self.stage_plan.num_devices} "
                 f"devices): predicted step {self.step_s:.4g} s (pipeline {self.pipeline_s:.4g}"
                 f" s simulated, bubble {self.bubble_fraction:.1%}, gradient sync "
                 f"{self.sync_s:.4g} s), {worst.total_bytes / GiB:.2f} GiB per device on "
                 f"rank {worst.rank}"]
        for s in self.stages if self.p <= 8 else (self.stages[0], self.stages[-1]):
            lines.append(f"  rank {s.rank}: {', '.join(s.groups)}; {s.total_bytes / GiB:.2f} "
                         f"GiB, {s.peak_stash} microbatch chunks stashed")
        if self.flat is None and not self.alternatives:
            lines.append("A given configuration: nothing was searched or compared.")
        elif self.flat is None:
            lines.append("Pipelining chosen: no plan without it fits the memory budget.")
        else:
            flat = self.flat.predicted.step_s
            verdict = "chosen" if self.pipelined else "not chosen"
            lines.append(f"Pipelining {verdict}: the best plan without it, {self.flat.name}, "
                         f"is predicted {flat:.4g} s ({self.step_s / flat - 1:+.1%} for the "
                         f"pipeline){'' if self.pipelined else '; use `flat`'}.")
        return "\n".join(lines + runners_up(self.alternatives, "s"))

    def to_plan(self, form: str = "mpmd") -> Plan:
        """The Plan the emitter runs: a `stage` axis of p before the stage mesh, the cut as
        layers per chunk, the schedule and predicted bubble; predicted memory is the
        largest rank's, its compute the simulated pipeline (bubble and p2p included) and its
        communication the gradient sync after the flush; the runners-up (the best plan
        without a pipeline first) carry over, so `explain()` says why pipelining was chosen."""
        stage = self.stage_plan
        chunks = sorted(c for s in self.stages for c in s.chunks)
        worst = max(self.stages, key=lambda s: s.total_bytes)
        predicted = Predicted(worst.memory_bytes, self.pipeline_s, self.sync_s, {},
                              self.source, None)
        return dataclasses.replace(
            stage, mesh=(("stage", self.p),) + stage.mesh, microbatches=self.m,
            name=self.name, predicted=predicted, alternatives=self.alternatives,
            pipeline=Pipeline(self.schedule, self.v, form, tuple(j - i for i, j in chunks),
                              self.bubble_fraction))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(dataclasses.asdict(self), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PipelinePlan:
        d = json.loads(text)
        d["stage_plan"] = Plan.from_json(json.dumps(d["stage_plan"]))
        d["flat"] = None if d["flat"] is None else Plan.from_json(json.dumps(d["flat"]))
        d["stages"] = tuple(Stage(s["rank"], tuple(map(tuple, s["chunks"])), tuple(s["groups"]),
                                  s["memory_bytes"], s["peak_stash"]) for s in d["stages"])
        d["chunk_times"] = tuple(map(tuple, d["chunk_times"]))
        d["alternatives"] = tuple(Alternative(**a) for a in d["alternatives"])
        return cls(**d)


def step_flops(graph: ModelGraph, remat: bool) -> tuple[float, float]:
    """(model, hardware) FLOPs of a step: 3 x forward, plus the stack's recomputed forward
    under remat (Megatron-LM's 'with recomputation' count)."""
    model = 3 * graph.flops_fwd
    recomputed = sum(g.flops_fwd * g.repeat for g in graph.groups if g.repeat > 1)
    return model, model + (recomputed if remat else 0.0)


# ------------------------------------------------------------------ one candidate, priced
@dataclasses.dataclass(frozen=True)
class _Config:
    p: int
    v: int
    m: int
    schedule: str
    microbatch_size: int
    stage_plan: Plan

    @property
    def name(self) -> str:
        chunks = f" v{self.v}" if self.v > 1 else ""
        return (f"pp{self.p}{chunks} {self.schedule} m{self.m} b{self.microbatch_size} x "
                f"{self.stage_plan.name}")


@dataclasses.dataclass(frozen=True)
class _Model:
    """What the pieces of a pipeline cost under one intra-stage plan and microbatch size."""

    layer: Cost
    first: Cost
    last: Cost
    p2p: float
    tied_sync: float
    batch: float
    reserve: float


class _Pricer:
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
        self._models: dict[tuple, _Model] = {}
        self._microbatch: dict[tuple, Cost] = {}
        self._step: dict[tuple, tuple[float, float]] = {}

    def model(self, p: int, plan: Plan, microbatch_size: int) -> _Model:
        key = (p, plan.mesh, plan.zero, plan.remat, microbatch_size)
        if key not in self._models:
            self._models[key] = self._price(p, plan, microbatch_size)
        return self._models[key]

    def _price(self, p: int, plan: Plan, microbatch_size: int) -> _Model:
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
        return _Model(pieces[len(parts.first)], first, last, p2p, tied_sync,
                      self.graph.batch_bytes / plan.data_parallel_size,
                      self.options.reserve_bytes)

    def _piece(self, index: int, group: Group, plan: Plan, microbatch_size: int) -> Cost:
        sizes = plan.mesh_shape
        key = (index, sizes["fsdp"], sizes["tensor"], plan.remat, microbatch_size)
        if key not in self._microbatch:
            inner = dataclasses.replace(plan, mesh=(("data", 1),) + plan.mesh[1:], zero=0)
            sub = subcluster(self.cluster, inner.num_devices)
            factor = microbatch_size * sizes["fsdp"] / self.graph.batch_size
            self._microbatch[key] = piece_cost(rescale(group, factor), inner, sub,
                                               self.options, sync_time(group, inner, sub))
        step = (index, plan.mesh, plan.zero)
        if step not in self._step:
            sub = subcluster(self.cluster, plan.num_devices)
            state = dataclasses.replace(group, matmuls=(), flops_fwd=0.0, saved=(),
                                        saved_remat=())
            self._step[step] = (sync_time(group, plan, sub),
                                group_terms(state, plan, sub, self.options).memory["optimizer"])
        sync, optimizer = self._step[step]
        return dataclasses.replace(self._microbatch[key], sync=sync, optimizer=optimizer)


def _proxy_memory(layers: Cost, extras: Cost, v: int, stashed: int, held: int,
                  model: _Model) -> dict[str, float]:
    """A chunk's rank memory as if the rank's other v - 1 chunks had the same layers (exact
    for v = 1): rank = v layers + extras, live = (stashed stash + held extra) / v."""
    rank = v * layers + extras
    live = (stashed * rank.stash + held * rank.extra) / v
    return rank_memory(rank, live, model.batch, model.reserve)


def _max_layers(model: _Model, extras: Cost, v: int, stashed: int, held: int,
                budget: float) -> int:
    """The most layers a chunk with `extras` may take: `_proxy_memory` <= budget solved for
    k (it is max(a k + c + temporary, (a + P) k + c + P0), both pieces linear in k)."""
    lay = model.layer
    a = v * (lay.params + lay.grads + lay.optimizer) + stashed * lay.stash + held * lay.extra
    c = (extras.params + extras.grads + extras.optimizer + model.batch + model.reserve
         + (stashed * extras.stash + held * extras.extra) / v)
    temporary = max(lay.temporary, extras.temporary)
    k = min((budget - c - temporary) / a, (budget - c - extras.params) / (a + v * lay.params))
    return math.floor(k + 1e-9)


def _estimate(model: _Model, cfg: _Config, layers: int, budget: float) -> float | None:
    """An O(1) estimate of the step: the least bottleneck T of chunks holding whole layers
    (the first on rank 0 and the last on rank p - 1 with their extras, the others at the
    worst rank's in-flight count, each under its memory cap), then Alpa's sum + (m - 1) max
    for one chunk per rank, m max(total / p, T) + (p - 1) total / (p v) interleaved, and the
    zero-bubble fill shrunk by its W share."""
    p, v, m = cfg.p, cfg.v, cfg.m
    chunks = p * v
    counts = in_flight(cfg.schedule, p, m, v)
    worst = tuple(max(x) for x in zip(*counts))
    lay = model.layer
    ell = lay.time
    kinds = ((model.first, 1, counts[0]), (Cost(), chunks - 2, worst),
             (model.last, 1, counts[-1]))
    caps = [min(_max_layers(model, e, v, *count, budget), layers) for e, _, count in kinds]
    if min(caps[0], caps[2]) < 1 or (chunks > 2 and caps[1] < 1):
        return None

    def holds(bottleneck: float) -> bool:
        sizes = [min(cap, math.floor((bottleneck - e.time) / ell + 1e-9))
                 for cap, (e, _, _) in zip(caps, kinds)]
        if min(s for s, (_, n, _) in zip(sizes, kinds) if n) < 1:
            return False
        return sum(s * n for s, (_, n, _) in zip(sizes, kinds)) >= layers

    bottleneck = math.inf
    for extra in {model.first.time, 0.0, model.last.time}:
        lo, hi = 1, layers
        if not holds(hi * ell + extra):
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if holds(mid * ell + extra) else (mid + 1, hi)
        bottleneck = min(bottleneck, lo * ell + extra)
    if math.isinf(bottleneck):
        return None
    total = layers * ell + model.first.time + model.last.time
    if v > 1:
        pipe = m * max(total / p, bottleneck) + (p - 1) * total / chunks
    elif cfg.schedule == "zero_bubble_h1":
        pipe = m * bottleneck + (total - bottleneck) * (lay.f + lay.b - lay.w) / ell
    else:
        pipe = m * bottleneck + total - bottleneck
    sync = layers / p * lay.sync + max(model.first.sync, model.last.sync) + model.tied_sync
    return pipe + 2 * (p - 1) * model.p2p + sync


def _cut(model: _Model, cfg: _Config, layers: int, budget: float
         ) -> tuple[tuple[int, int], ...] | None:
    """The DP cut of `layers` identical layers into p v chunks under each rank's memory (a
    chunk's memory depends on its layer count k = j - i, its rank's in-flight counts and
    whether it is the first or the last chunk: priced once per such kind)."""
    chunks = cfg.p * cfg.v
    counts = in_flight(cfg.schedule, cfg.p, cfg.m, cfg.v)
    index = np.arange(layers + 1)
    span = np.maximum(index[None, :] - index[:, None], 0)
    kinds: dict[tuple, np.ndarray] = {}

    def fits(c: int) -> np.ndarray:
        kind = (counts[c % cfg.p], c == 0, c == chunks - 1)
        if kind not in kinds:
            (stashed, held), _, _ = kind
            memory = sum(_proxy_memory(model.layer * index, _extras(model, c, chunks), cfg.v,
                                       stashed, held, model).values())
            kinds[kind] = (memory <= budget)[span]
        return kinds[kind]

    found = cut_layers([model.layer.time] * layers, chunks, model.first.time,
                       model.last.time, fits)
    return None if found is None else found[0]


def _extras(model: _Model, chunk: int, chunks: int) -> Cost:
    """What chunk `chunk` of `chunks` adds to its layers: the first and / or last groups."""
    extras = Cost()
    if chunk == 0:
        extras = extras + model.first
    if chunk == chunks - 1:
        extras = extras + model.last
    return extras


def _chunk_costs(model: _Model, bounds: Sequence[tuple[int, int]]) -> list[Cost]:
    return [model.layer * (j - i) + _extras(model, c, len(bounds))
            for c, (i, j) in enumerate(bounds)]


def _sync(model: _Model, costs: Sequence[Cost], p: int) -> float:
    """Gradient sync after the flush: the slowest rank's, then the tied embedding's."""
    return max(sum(c.sync for c in costs[r::p]) for r in range(p)) + model.tied_sync


def _finish(pricer: _Pricer, cfg: _Config, model: _Model, bounds: Sequence[tuple[int, int]]
            ) -> PipelinePlan:
    """Simulate the cut and lay out its ranks' groups and memory."""
    p, v = cfg.p, cfg.v
    costs = _chunk_costs(model, bounds)
    schedule = make_schedule(cfg.schedule, p, cfg.m, v)
    result = simulate(schedule, [c.f for c in costs], [c.b for c in costs],
                      [c.w for c in costs], model.p2p)
    parts = pricer.parts
    stages = []
    for r in range(p):
        mine = range(r, p * v, p)
        rank = sum((costs[c] for c in mine), Cost())
        live = live_bytes(schedule.ops[r], [c.stash for c in costs], [c.extra for c in costs],
                          schedule.splits_backward)
        groups = []
        for c in mine:
            if c == 0:
                groups += [g.name for g in parts.first]
            groups.append(f"{parts.layer.name}[{bounds[c][0]}:{bounds[c][1]}]")
            if c == p * v - 1:
                groups += [g.name + (" (tied output)" if {q.path for q in g.params}
                                     & set(parts.tied) else "") for g in parts.last]
        memory = {k: float(x) for k, x in rank_memory(rank, live, model.batch,
                                                      model.reserve).items()}
        stages.append(Stage(r, tuple(bounds[c] for c in mine), tuple(groups), memory,
                            result.peak_stash[r]))
    return PipelinePlan(p, v, cfg.m, cfg.schedule, cfg.microbatch_size, cfg.stage_plan,
                        tuple(stages), tuple((c.f, c.b, c.w) for c in costs), model.p2p,
                        result.step_time, _sync(model, costs, p), result.bubble_fraction)


# --------------------------------------------------------------------- fixed configuration
def evaluate_pipeline(graph: ModelGraph, cluster: Cluster, *, p: int, v: int = 1, m: int,
                      schedule: str = "1f1b", mesh: str, zero: int = 0, remat: bool = True,
                      memory_budget: float | None = None,
                      options: Options | None = None) -> PipelinePlan:
    """A given pipeline (e.g. a paper's own choice) priced by the planner's model: p stages of
    the named intra-stage plan `mesh` ("dp6+tp8") over N / p devices, v chunks per rank, m
    microbatches (defaults as Megatron-LM ran in 2021: remat on, no ZeRO); the layers cut by
    the same DP. Raises ValueError / PlanError with the
    numbers when p does not divide the devices, the layers do not cover p v chunks, the
    schedule refuses m, or no cut fits the memory budget."""
    options = options or Options()
    budget = cluster.memory_bytes if memory_budget is None else memory_budget
    n_dev = cluster.num_devices
    if p < 1 or n_dev % p:
        raise ValueError(f"p={p} stages do not divide {n_dev} devices; use a divisor of "
                         f"{n_dev}")
    pricer = _Pricer(graph, cluster, options)
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
    cfg = _Config(p, v, m, schedule, per_replica // m, stage)
    model = pricer.model(p, stage, cfg.microbatch_size)
    bounds = _cut(model, cfg, layers, budget)
    if bounds is None:
        raise PlanError(_no_fit(model, cfg, layers, budget))
    plan = _finish(pricer, cfg, model, bounds)
    if plan.memory_bytes > budget:
        raise PlanError(f"{plan.name}: the cut needs {plan.memory_bytes / GiB:.2f} GiB on its "
                        f"largest rank; the budget is {budget / GiB:.2f} GiB; use remat, more "
                        f"stages or smaller microbatches")
    return dataclasses.replace(plan, source="analytic, fixed configuration")


def _no_fit(model: _Model, cfg: _Config, layers: int, budget: float) -> str:
    """Why no cut fits: the balanced cut's first rank, by category, and what would shrink it."""
    chunks = cfg.p * cfg.v
    per = math.ceil(layers / chunks)
    stashed, held = in_flight(cfg.schedule, cfg.p, cfg.m, cfg.v)[0]
    memory = {k: float(x) for k, x in _proxy_memory(model.layer * per, model.first, cfg.v,
                                                    stashed, held, model).items()}
    parts = ", ".join(f"{k} {x / GiB:.2f}" for k, x in memory.items())
    stage, sizes = cfg.stage_plan, cfg.stage_plan.mesh_shape
    fixes = [fix for fix, useful in (
        ("remat", not stage.remat),
        ("ZeRO-1", not stage.zero and sizes["data"] > 1),
        ("more stages", chunks < layers),
        ("smaller microbatches", cfg.microbatch_size > 1),
        ("more tensor parallelism", sizes["tensor"] < stage.num_devices)) if useful]
    return (f"no cut of {layers} layers into {chunks} chunks fits {budget / GiB:.2f} GiB per "
            f"device with {stage.name} stages, {cfg.schedule} m={cfg.m}: rank 0 with "
            f"{per}-layer chunks and {stashed} microbatch chunks stashed needs "
            f"{sum(memory.values()) / GiB:.2f} GiB ({parts}); try "
            f"{', '.join(fixes) or 'more devices'}")


# --------------------------------------------------------------------------------- search
def _stage_meshes(graph: ModelGraph, cluster: Cluster, devices: int) -> list[Plan]:
    """Intra-stage meshes of `devices` devices, data x fsdp x tensor with fsdp x tensor inside
    one node (a stage re-gathers fsdp shards every microbatch: over the NIC that never pays),
    that lay out every parameter."""
    meshes = []
    for t in divisors(min(devices, cluster.devices_per_node)):
        for f in divisors(cluster.devices_per_node // t):
            if devices % (t * f):
                continue
            plan = Plan(mesh=(("data", devices // (t * f)), ("fsdp", f), ("tensor", t)))
            try:
                for info in graph.params:
                    plan.check_param(info)
            except PlanError:
                continue
            meshes.append(plan)
    return meshes


def _variants(mesh: Plan) -> list[Plan]:
    """The mesh's ZeRO / remat variants, fastest first: each later one only saves memory
    (ZeRO-1 adds an update all-gather, remat a forward pass)."""
    zeros = (0, 1) if mesh.mesh_shape["data"] > 1 else (0,)
    plans = [dataclasses.replace(mesh, zero=z, remat=r) for r in (False, True) for z in zeros]
    return [dataclasses.replace(plan, name=describe(plan)) for plan in plans]


def _candidates(pricer: _Pricer, cluster: Cluster, budget: float, schedules: Sequence[str],
                virtual: Sequence[int], max_microbatch_size: int
                ) -> list[tuple[float, _Config]]:
    """Every (p, stage plan, microbatch size b, schedule, v) with an estimate, best first:
    p divides the devices with whole-node or in-node stages, b a power of two; a schedule
    takes the first ZeRO / remat variant under which it fits (a slower variant that also
    fits could only win where memory, not time, shapes the cut)."""
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
                open_ = [(name, v) for name in schedules
                         for v in (virtual if name == "interleaved_1f1b" else (1,))
                         if (v > 1 or name != "interleaved_1f1b") and p * v <= layers
                         and schedule_allows(name, p, m, v)]
                for stage in _variants(mesh):
                    if not open_:
                        break
                    model = pricer.model(p, stage, b)
                    for name, v in list(open_):
                        cfg = _Config(p, v, m, name, b, stage)
                        estimate = _estimate(model, cfg, layers, budget)
                        if estimate is not None:
                            found.append((estimate, cfg))
                            open_.remove((name, v))
    found.sort(key=lambda x: x[0])
    return found


def plan_pipeline(graph: ModelGraph, cluster: Cluster, memory_budget: float | None = None,
                  options: Options | None = None, *, schedules: Sequence[str] = SCHEDULES,
                  virtual: Sequence[int] = (1, 2, 4), max_microbatch_size: int = 8,
                  cuts: int = 24, simulated_ops: int = 300_000, alternatives: int = 8
                  ) -> PipelinePlan:
    """The fastest pipeline that fits `memory_budget` per device, with the best plan without
    one (`plan_sharding` on the whole cluster) in `flat` and among the runners-up.

    Round 2 cuts the `cuts` best estimates (stopping past 1.25 x the best bound so far);
    round 3 simulates the cuts best bound first until the next bound cannot beat the best
    simulated step or `simulated_ops` F / B / W ops have been simulated (the first always is;
    the simulator takes some 10 us per op).
    """
    options = options or Options()
    budget = cluster.memory_bytes if memory_budget is None else memory_budget
    start = time.process_time()
    pricer = _Pricer(graph, cluster, options)
    layers = pricer.parts.layers
    ranked = _candidates(pricer, cluster, budget, schedules, virtual, max_microbatch_size)
    bounded: list[tuple[float, _Config, tuple[tuple[int, int], ...]]] = []
    for estimate, cfg in ranked[:cuts]:
        if bounded and estimate > 1.25 * min(b for b, _, _ in bounded):
            break
        model = pricer.model(cfg.p, cfg.stage_plan, cfg.microbatch_size)
        cut = _cut(model, cfg, layers, budget)
        if cut is not None:
            costs = _chunk_costs(model, cut)
            bounded.append((pipeline_bound(costs, cfg.schedule, cfg.p, cfg.m, cfg.v, model.p2p)
                            + _sync(model, costs, cfg.p), cfg, cut))
    bounded.sort(key=lambda x: x[0])
    simulated: list[PipelinePlan] = []
    losers: list[tuple[str, float, float, str]] = []
    ops = 0
    for bound, cfg, cut in bounded:
        if (ops and ops >= simulated_ops) or \
                bound >= min((s.step_s for s in simulated), default=math.inf):
            losers.append((cfg.name, bound, math.nan, "lower bound"))
            continue
        plan = _finish(pricer, cfg, pricer.model(cfg.p, cfg.stage_plan, cfg.microbatch_size),
                       cut)
        ops += (3 if cfg.schedule == "zero_bubble_h1" else 2) * cfg.p * cfg.v * cfg.m
        if plan.memory_bytes > budget:
            losers.append((cfg.name, plan.step_s, plan.memory_bytes, f"needs "
                           f"{plan.memory_bytes / GiB:.2f} GiB > {budget / GiB:.2f} GiB"))
        else:
            simulated.append(plan)
    if not simulated:
        raise PlanError(_nothing_fits(pricer, cluster, budget))
    simulated.sort(key=lambda s: s.step_s)
    best = simulated[0]
    losers += [(s.name, s.step_s, s.memory_bytes, "simulated") for s in simulated[1:]]
    flat, flat_line = _flat(graph, cluster, budget, options, best)
    runners = [flat_line] + [
        Alternative(name, step, memory, how if how.startswith("needs") else
                    f"{step / best.step_s - 1:+.1%} step time ({how})")
        for name, step, memory, how in sorted(losers, key=lambda x: x[1])][:alternatives - 1]
    return dataclasses.replace(best, flat=flat, alternatives=tuple(runners),
                               source=f"analytic: {len(ranked)} configurations estimated, "
                                      f"{len(bounded)} cut, {len(simulated)} simulated in "
                                      f"{time.process_time() - start:.2f} s")


def _nothing_fits(pricer: _Pricer, cluster: Cluster, budget: float) -> str:
    """The leanest pipeline's shortfall: the most stages, the most tensor parallelism inside a
    node, ZeRO-1, remat, one sample per microbatch, 1F1B."""
    graph, layers = pricer.graph, pricer.parts.layers
    p = max((d for d in divisors(cluster.num_devices) if d <= layers and
             _stage_meshes(graph, cluster, cluster.num_devices // d)), default=None)
    if p is None:
        return (f"no pipeline of {cluster.num_devices} devices can lay out {layers} layers; "
                f"use a device count with a divisor p <= {layers} whose stages fit whole nodes")
    mesh = max(_stage_meshes(graph, cluster, cluster.num_devices // p),
               key=lambda plan: (plan.mesh_shape["tensor"], plan.mesh_shape["fsdp"]))
    stage = _variants(mesh)[-1]
    m = graph.batch_size // stage.data_parallel_size
    cfg = _Config(p, 1, m, "1f1b", 1, stage)
    return _no_fit(pricer.model(p, stage, 1), cfg, layers, budget) + " (the leanest pipeline)"


def _flat(graph: ModelGraph, cluster: Cluster, budget: float, options: Options,
          best: PipelinePlan) -> tuple[Plan | None, Alternative]:
    """The best plan without pipelining, and its line among the runners-up."""
    try:
        flat = plan_sharding(graph, cluster, budget, options)
    except PlanError as err:
        return None, Alternative("no pipeline", math.nan, math.nan, str(err).split(";")[0])
    step = flat.predicted.step_s
    return flat, Alternative(f"no pipeline: {flat.name}", step, flat.predicted.total_bytes,
                             f"{step / best.step_s - 1:+.1%} step time "
                             f"({'lost' if step >= best.step_s else 'won: use `flat`'})")
