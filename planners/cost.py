"""Analytic cost model: the time and per-device memory of a plan, summed over layer groups.

Time = compute + communication (no overlap assumed). Compute is the group's FLOPs split
over the devices that share the work, at the cluster's matmul rate. Collectives follow the
alpha-beta model with ring factors: all-reduce 2(n-1)/n B/bw, all-gather and reduce-scatter
(n-1)/n B/bw, where B is the bytes of the full result on one device. A collective over a
mesh axis runs on the links its device stride reaches (inside a node or across nodes).

What the emitter does, which this mirrors (docs/plans.md): per microbatch, a layer's
fsdp-sharded parameters are all-gathered in the forward pass and again in the backward
pass, and their gradients reduce-scattered; gradients are all-reduced over the
data-parallel axes they are replicated on once per step; Megatron matmuls all-reduce
their output (forward, contracted dimension split) or their input gradient (backward, kept
dimension split) over `tensor`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence

from jaxpar.plan import ParamInfo, Plan, Predicted
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.graph import Group, ModelGraph, Tensor

RING_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n,
               "all-gather": lambda n: (n - 1) / n,
               "reduce-scatter": lambda n: (n - 1) / n,
               "all-to-all": lambda n: (n - 1) / n}


@dataclasses.dataclass(frozen=True)
class Options:
    """Knobs of the model that are not the plan: optimizer slots per parameter (Adam: 2),
    the fraction of the cluster's peak FLOP/s a matmul reaches, and the bytes set aside
    for XLA's own buffers."""

    optimizer_slots: int = 2
    efficiency: float = 1.0
    reserve_bytes: float = 0.0


def _zeros() -> defaultdict[str, float]:
    return defaultdict(float)


@dataclasses.dataclass
class Terms:
    """One group's share of a plan's cost; added up over groups into a Predicted."""

    compute_s: float = 0.0
    communication_s: float = 0.0
    collective_bytes: dict[str, float] = dataclasses.field(default_factory=_zeros)
    memory: dict[str, float] = dataclasses.field(default_factory=_zeros)
    temporary: float = 0.0  # live only while the group runs: the max over groups counts

    def collective(self, cluster: Cluster, plan: Plan, kind: str, axes: tuple[str, ...],
                   nbytes: float, times: float = 1.0) -> None:
        n = math.prod(plan.mesh_shape[a] for a in axes)
        if n <= 1 or nbytes <= 0:
            return
        bandwidth, latency = link(cluster, plan, axes)
        self.communication_s += times * (latency + RING_FACTOR[kind](n) * nbytes / bandwidth)
        self.collective_bytes[kind] += times * nbytes


def link(cluster: Cluster, plan: Plan, axes: tuple[str, ...]) -> tuple[float, float]:
    """(bandwidth, latency) of a collective over mesh `axes`: devices are laid out
    row-major over the mesh, so an axis' stride is the product of the later axes' sizes."""
    names = [name for name, _ in plan.mesh]
    sizes = plan.mesh_shape
    span = 0
    for axis in axes:
        stride = math.prod(sizes[b] for b in names[names.index(axis) + 1:])
        span += stride * (sizes[axis] - 1)
    return cluster.link(span + 1, 1)


def _size(plan: Plan, axes) -> int:
    return math.prod(plan.mesh_shape[a] for a in axes)


def _layer_shape(p: ParamInfo, stacked: bool) -> tuple[int, ...]:
    return p.shape[1:] if stacked else p.shape


def group_terms(group: Group, plan: Plan, cluster: Cluster,
                options: Options | None = None) -> Terms:
    """Time and memory of `group` under `plan` for one training step."""
    options = options or Options()
    t = Terms()
    manual = plan.batch_axes
    dp, m = plan.data_parallel_size, plan.microbatches
    stacked = group.repeat > 1 or any(p.logical_axes[:1] == ("layers",) for p in group.params)
    remat = plan.remat and stacked
    layout = {p.path: plan.param_layout(p) for p in group.params}
    auto = {path: tuple(a for axes in lay for a in axes if a not in manual)
            for path, lay in layout.items()}

    # ---- compute: forward, backward (2x forward), and the recomputed forward under remat
    param_flops, split_flops = 0.0, 0.0
    by_param = {p.path: p for p in group.params}
    for mm in group.matmuls:
        param_flops += mm.flops
        split_flops += mm.flops / _size(plan, auto.get(mm.param, ()))
    other_split = _size(plan, {a for axes in auto.values() for a in axes}) if auto else 1
    device_flops = (split_flops + (group.flops_fwd - param_flops) / other_split) / dp
    passes = 3 + (1 if remat else 0)
    t.compute_s = group.repeat * passes * device_flops / (cluster.peak_flops * options.efficiency)

    # ---- tensor parallelism: Megatron all-reduces of activations (per layer, per step)
    for mm in group.matmuls:
        p = by_param.get(mm.param)
        if p is None:
            continue
        axes_of = dict(zip(p.logical_axes, layout[p.path]))
        contracted = tuple(a for name in mm.contracting for a in axes_of.get(name, ())
                           if a not in manual)
        kept = tuple(a for name in mm.free for a in axes_of.get(name, ()) if a not in manual)
        forward_times = group.repeat * (2 if remat else 1)
        t.collective(cluster, plan, "all-reduce", contracted, mm.out_bytes / dp / _size(
            plan, kept), forward_times)
        t.collective(cluster, plan, "all-reduce", kept, mm.in_bytes / dp, group.repeat)

    # ---- parameters: fsdp gathers and reduce-scatters, data-parallel all-reduce
    gathers = 2 if stacked else 1  # a layer's gathered copy is recomputed, not saved
    for p in group.params:
        lay = layout[p.path]
        full = math.prod(_layer_shape(p, stacked)) * p.nbytes / max(math.prod(p.shape), 1)
        layer_bytes = full / _size(plan, auto[p.path])
        sharded_over = tuple(a for axes in lay for a in axes if a in manual)
        replicated_over = tuple(a for a in manual if a not in sharded_over)
        times = group.repeat * m
        t.collective(cluster, plan, "all-gather", sharded_over, layer_bytes, gathers * times)
        t.collective(cluster, plan, "reduce-scatter", sharded_over, layer_bytes, times)
        shard = p.nbytes / _size(plan, sum(lay, ()))
        t.collective(cluster, plan, "all-reduce", replicated_over, shard)
        if sharded_over:
            t.temporary = max(t.temporary, 2 * layer_bytes)
        t.memory["params"] += shard
        t.memory["grads"] += shard
        opt = p.nbytes / _size(plan, sum(plan.optimizer_layout(p), ()))
        t.memory["optimizer"] += options.optimizer_slots * opt
        extra = tuple(a for a in sum(plan.optimizer_layout(p), ()) if a not in sum(lay, ()))
        t.collective(cluster, plan, "all-gather", extra, shard)  # ZeRO-1: updates gathered

    # ---- activations saved for backward, one microbatch at a time (the scan); the backward
    # pass of a layer holds that layer's full set (recomputed under remat) as working memory
    saved = group.saved_remat if remat else group.saved
    t.memory["activations"] += group.repeat * activation_bytes(saved, plan) / m
    t.temporary = max(t.temporary, activation_bytes(group.saved, plan) / m)
    return t


def activation_bytes(tensors: Sequence[Tensor], plan: Plan) -> float:
    """Per-device bytes of activations laid out by the plan's rules (unknown axes whole)."""
    known = {name for name, _ in plan.rules}
    total = 0.0
    for tensor in tensors:
        names = [a if a in known else None for a in tensor.logical_axes]
        total += tensor.nbytes / _size(plan, sum(plan.layout(names), ()))
    return total


def predict(graph: ModelGraph, plan: Plan, cluster: Cluster,
            options: Options | None = None) -> Predicted:
    """The plan's predicted step time and per-device memory by category."""
    options = options or Options()
    compute = communication = temporary = 0.0
    collectives: dict[str, float] = defaultdict(float)
    memory: dict[str, float] = defaultdict(float)
    for group in graph.groups:
        t = group_terms(group, plan, cluster, options)
        compute += t.compute_s
        communication += t.communication_s
        temporary = max(temporary, t.temporary)
        for k, v in t.collective_bytes.items():
            collectives[k] += v
        for k, v in t.memory.items():
            memory[k] += v
    memory["batch"] = graph.batch_bytes / plan.data_parallel_size
    # the optimizer update needs a parameter-sized buffer when activations are gone
    memory["temporaries"] = max(temporary, memory["params"]) + options.reserve_bytes
    return Predicted(dict(memory), compute, communication, dict(collectives), "analytic")
