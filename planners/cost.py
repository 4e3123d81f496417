"""Analytic cost model: the time and per-device memory of a plan, summed over layer groups.

Time = compute + memory-bound local work + communication (no overlap assumed). Compute is
the group's FLOPs split over the devices that share the work, at the cluster's matmul rate.
Memory-bound work is the parameter-sized traffic every device repeats on its own shard:
writing each microbatch's weight gradient, adding it into the running sum, and the optimizer
update; bytes / the cluster's memory bandwidth. Collectives follow the alpha-beta model with
ring factors: all-reduce 2(n-1)/n B/bw, all-gather, reduce-scatter and all-to-all
(n-1)/n B/bw, where B is the full buffer on one device (the all-gather's result, the
reduce-scatter's operand), on the link figures of the collective's kind, with a latency that
grows with the participants (`Cluster.latency_per_device`: a collective starts when its last
device arrives). A collective over a mesh axis runs on the links its device stride reaches
(inside a node or across nodes).

What the emitter does, which this mirrors (docs/plans.md): per microbatch, a layer's
fsdp-sharded parameters (each device its `tensor` slice of them) are all-gathered in the
forward pass and again in the backward pass, and their gradients reduce-scattered (or
all-reduced whole, `Plan.grad_reduce`); gradients are all-reduced over the data-parallel
axes they are replicated on once per step; where the compiler merges independent
collectives of a kind (`Cluster.combined_kinds`), a layer's parameter collectives of that
kind are one collective;
Megatron matmuls all-reduce their output (forward, contracted dimension split) or their
input gradient (backward, kept dimension split) over `tensor`, per microbatch; key / value
heads replicated over the `tensor` axis the query heads are split over (grouped-query
attention with fewer kv heads than the tensor degree) have their gradient summed over it in
the backward, per microbatch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import defaultdict
from collections.abc import Sequence

from jaxpar.plan import REMAT, Layout, ParamInfo, Plan, Predicted
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
    """One group's share of a plan's cost; added up over groups into a Predicted.
    `collective_bytes` are per kind the bytes of the collectives' results on one device, as
    the compiled HLO types them (a reduce-scatter's result is 1/n of its operand)."""

    compute_s: float = 0.0
    memory_s: float = 0.0
    microbatch_memory_s: float = 0.0  # the share of memory_s each further microbatch adds
    communication_s: float = 0.0
    latency_s: float = 0.0  # the share of communication_s that is collective latency
    collective_bytes: dict[str, float] = dataclasses.field(default_factory=_zeros)
    memory: dict[str, float] = dataclasses.field(default_factory=_zeros)
    temporary: float = 0.0  # live only while the group runs: the max over groups counts

    def collective(self, cluster: Cluster, plan: Plan, kind: str, axes: tuple[str, ...],
                   nbytes: float, times: float = 1.0) -> None:
        """Book `times` collectives of `kind` over mesh `axes` on a full buffer of `nbytes`
        per device (the all-gather's result, the reduce-scatter's operand)."""
        n = math.prod(plan.mesh_shape[a] for a in axes)
        if n <= 1 or nbytes <= 0:
            return
        bandwidth, latency = link(cluster, plan, axes, kind)
        self.latency_s += times * latency
        self.communication_s += times * (latency + RING_FACTOR[kind](n) * nbytes / bandwidth)
        result = nbytes / n if kind == "reduce-scatter" else nbytes
        self.collective_bytes[kind] += times * result


def link(cluster: Cluster, plan: Plan, axes: tuple[str, ...],
         kind: str | None = None) -> tuple[float, float]:
    """(bandwidth, latency) of a collective of `kind` over mesh `axes`: devices are laid out
    row-major over the mesh, so an axis' stride is the product of the later axes' sizes, and
    the group spans the sum of stride x (size - 1) over its axes."""
    return cluster.link(_size(plan, axes), 1, kind, span=_span(plan.mesh, tuple(axes)))


@functools.lru_cache(maxsize=4096)
def _span(mesh: tuple[tuple[str, int], ...], axes: tuple[str, ...]) -> int:
    names = [name for name, _ in mesh]
    sizes = dict(mesh)
    span = 0
    for axis in axes:
        stride = math.prod(sizes[b] for b in names[names.index(axis) + 1:])
        span += stride * (sizes[axis] - 1)
    return span


def _size(plan: Plan, axes) -> int:
    return math.prod(plan.mesh_shape[a] for a in axes)


def _layer_shape(p: ParamInfo, stacked: bool) -> tuple[int, ...]:
    return p.shape[1:] if stacked else p.shape


def streamed_bytes(gradient: float, shard: float, update: float, microbatches: int,
                   slots: float) -> float:
    """Bytes one device moves through memory per step for one parameter, outside matmuls:
    per microbatch the backward writes the weight `gradient` (whole over the batch axes, as
    the matmul computes it), and from the second microbatch on its reduced `shard` is added
    into the running sum (two reads, one write); once per step the update reads the gradient
    and reads and writes the parameter and its optimizer slots on the optimizer's shard
    (`update` bytes): m G + 3 (m - 1) S + (3 + 2 slots) U."""
    m = microbatches
    return m * gradient + 3 * (m - 1) * shard + (3 + 2 * slots) * update


def is_stacked(group: Group) -> bool:
    """Whether `group` is a stack of layers run by a scan: the only kind a remat policy
    applies to."""
    return group.repeat > 1 or any(p.logical_axes[:1] == ("layers",) for p in group.params)


def group_terms(group: Group, plan: Plan, cluster: Cluster,
                options: Options | None = None) -> Terms:
    """Time and memory of `group` under `plan` for one training step."""
    return group_variants(group, plan, cluster, options, [(plan.remat, plan.microbatches)])[0]


def group_variants(group: Group, plan: Plan, cluster: Cluster, options: Options | None,
                   variants: Sequence[tuple[str, int]]) -> list[Terms]:
    """`group_terms` under `plan` with each (remat policy, microbatches) of `variants` in turn: the
    layout is priced once (what each collective moves, on which links), the counts per
    variant."""
    priced = _price_layout(group, plan, cluster, options or Options())
    return [priced.terms(remat, m) for remat, m in variants]


@dataclasses.dataclass(frozen=True)
class _Booking:
    """A collective over `n` devices on links of `bandwidth` and `latency`, `count` times
    per step, times the microbatches when `per_microbatch`, twice under full remat when
    `recomputed`; its buffer is `nbytes` per step, a microbatch's share when `split`."""

    kind: str
    n: int
    bandwidth: float
    latency: float
    nbytes: float
    count: float
    per_microbatch: bool = True
    split: bool = False
    recomputed: bool = False


@dataclasses.dataclass(frozen=True)
class _PricedLayout:
    """What a group's cost under one layout is made of, before the remat policy and
    microbatches."""

    stacked: bool
    compute_s: float  # one pass (forward) of every layer
    bookings: tuple[_Booking, ...]
    streamed: tuple[tuple[float, float, float], ...]  # (gradient, shard, update) per param
    memory_bandwidth: float
    slots: int
    memory: dict[str, float]
    parameter_temporary: float
    activations: dict[str, float]  # saved for backward over one step's batch, all layers,
    # under each remat policy
    layer_activations: float  # one layer's full set: the backward's working memory
    elementwise_s: float  # "dots": writing and reading again what it does not save

    def terms(self, remat: str, m: int) -> Terms:
        """Under "dots" the backward recomputes elementwise work only (no matmul, no
        collective): memory-bound, priced as the bytes "none" would have saved written and
        read once more, on the memory bandwidth, in `compute_s`."""
        remat = remat if self.stacked else "none"
        recomputed = remat == "full"
        t = Terms(compute_s=(3 + recomputed) * self.compute_s
                  + (self.elementwise_s if remat == "dots" else 0.0))
        for b in self.bookings:
            times = b.count * (m if b.per_microbatch else 1) * (2 if recomputed and b.recomputed
                                                                 else 1)
            nbytes = b.nbytes / m if b.split else b.nbytes
            t.latency_s += times * b.latency
            t.communication_s += times * (b.latency
                                          + RING_FACTOR[b.kind](b.n) * nbytes / b.bandwidth)
            t.collective_bytes[b.kind] += times * (nbytes / b.n if b.kind == "reduce-scatter"
                                                   else nbytes)
        for gradient, shard, update in self.streamed:
            t.memory_s += streamed_bytes(gradient, shard, update, m, self.slots
                                         ) / self.memory_bandwidth
            t.microbatch_memory_s += (gradient + 3 * shard) / self.memory_bandwidth
        t.memory.update(self.memory)
        t.memory["activations"] += self.activations[remat] / m
        t.temporary = max(self.parameter_temporary, self.layer_activations / m)
        return t


def _price_layout(group: Group, plan: Plan, cluster: Cluster, options: Options
                  ) -> _PricedLayout:
    manual = plan.batch_axes
    dp = plan.data_parallel_size
    stacked = is_stacked(group)
    layout = {p.path: plan.param_layout(p) for p in group.params}
    auto = {path: tuple(a for axes in lay for a in axes if a not in manual)
            for path, lay in layout.items()}
    bookings: list[_Booking] = []

    def book(kind: str, axes: tuple[str, ...], nbytes: float, count: float,
             into: list[_Booking] = bookings, **how) -> None:
        n = _size(plan, axes)
        if n > 1 and nbytes > 0:
            bandwidth, latency = link(cluster, plan, axes, kind)
            into.append(_Booking(kind, n, bandwidth, latency, nbytes, count, **how))

    # ---- compute: forward, backward (2x forward), and the recomputed forward under full remat
    param_flops, split_flops = 0.0, 0.0
    by_param = {p.path: p for p in group.params}
    for mm in group.matmuls:
        param_flops += mm.flops
        split_flops += mm.flops / _size(plan, auto.get(mm.param, ()))
    other_split = _size(plan, {a for axes in auto.values() for a in axes}) if auto else 1
    device_flops = (split_flops + (group.flops_fwd - param_flops) / other_split) / dp
    compute_s = group.repeat * device_flops / (cluster.peak_flops * options.efficiency)

    # ---- tensor parallelism: Megatron all-reduces of activations (per layer and microbatch)
    for mm in group.matmuls:
        p = by_param.get(mm.param)
        if p is None:
            continue
        axes_of = dict(zip(p.logical_axes, layout[p.path]))
        contracted = tuple(a for name in mm.contracting for a in axes_of.get(name, ())
                           if a not in manual)
        kept = tuple(a for name in mm.free for a in axes_of.get(name, ()) if a not in manual)
        book("all-reduce", contracted, mm.out_bytes / dp / _size(plan, kept), group.repeat,
             split=True, recomputed=True)
        book("all-reduce", kept, mm.in_bytes / dp, group.repeat, split=True)
        if "kv_heads" in mm.free:
            bookings += _kv_head_gradient(plan, cluster, p, layout[p.path],
                                          mm.out_bytes / dp / _size(plan, kept), group.repeat)

    # ---- parameters: fsdp gathers and reduce-scatters, data-parallel all-reduce, and the
    # memory-bound gradient and update work on each device's copy
    gathers = 2 if stacked else 1  # a layer's gathered copy is recomputed, not saved
    memory = {"params": 0.0, "grads": 0.0, "optimizer": 0.0}
    temporary = 0.0
    streamed = []
    per_param: list[_Booking] = []
    for p in group.params:
        lay = layout[p.path]
        full = math.prod(_layer_shape(p, stacked)) * p.nbytes / max(math.prod(p.shape), 1)
        layer_bytes = full / _size(plan, auto[p.path])
        sharded_over = tuple(a for axes in lay for a in axes if a in manual)
        replicated_over = tuple(a for a in manual if a not in sharded_over)
        book("all-gather", sharded_over, layer_bytes, gathers * group.repeat, per_param)
        book(plan.grad_reduce, sharded_over, layer_bytes, group.repeat, per_param)
        shard = p.nbytes / _size(plan, sum(lay, ()))
        book("all-reduce", replicated_over, shard, 1, per_param, per_microbatch=False)
        if sharded_over:
            temporary = max(temporary, 2 * layer_bytes)
        memory["params"] += shard
        memory["grads"] += shard
        opt_axes = sum(plan.optimizer_layout(p), ())
        opt = p.nbytes / _size(plan, opt_axes)
        memory["optimizer"] += options.optimizer_slots * opt
        streamed.append((p.nbytes / _size(plan, auto[p.path]), shard, opt))
        extra = tuple(a for a in opt_axes if a not in sum(lay, ()))
        book("all-gather", extra, shard, 1, per_param, per_microbatch=False)  # ZeRO-1 updates
    bookings += combine(per_param, cluster.combined_kinds)

    # ---- activations saved for backward, one microbatch at a time (the scan); the backward
    # pass of a layer holds that layer's full set (recomputed under remat) as working memory
    saved = {remat: group.repeat * activation_bytes(group.saved_under(remat), plan)
             for remat in REMAT}
    elementwise = 2 * max(saved["none"] - saved["dots"], 0.0) / cluster.memory_bandwidth
    return _PricedLayout(stacked, compute_s, tuple(bookings), tuple(streamed),
                         cluster.memory_bandwidth, options.optimizer_slots, memory, temporary,
                         saved, saved["none"] / group.repeat, elementwise)


def _kv_head_gradient(plan: Plan, cluster: Cluster, p: ParamInfo, layout: Layout,
                      nbytes: float, repeat: int) -> list[_Booking]:
    """Grouped-query attention: the key / value heads `p` projects to, where not split over
    automatic mesh axes the query heads are (fewer kv heads than the tensor degree, see
    `rules.FIT_TO_SIZE`), get from each device only its query heads' share of their gradient,
    which the backward sums over those n devices (per layer and microbatch; `nbytes` is the
    projection's output on one device). As XLA does it: of the n devices, s = gcd(kv heads,
    n) hold distinct kv heads' queries; an all-reduce of each device's 1/s over the n/s
    devices that share its kv heads, then an all-gather of the whole over s."""
    if "heads" not in {name for name, _ in plan.rules}:
        return []
    manual = plan.batch_axes
    kv = p.logical_axes.index("kv_heads")
    over = tuple(a for a in plan.layout(("heads",))[0]
                 if a not in manual and a not in layout[kv])
    n = _size(plan, over)
    if n == 1:
        return []
    s = math.gcd(p.shape[kv], n)
    span = _span(plan.mesh, over)
    out = []
    for kind, size, buffer in (("all-reduce", n // s, nbytes / s), ("all-gather", s, nbytes)):
        if size > 1:
            bandwidth, latency = cluster.link(size, 1, kind, span=span)
            out.append(_Booking(kind, size, bandwidth, latency, buffer, repeat, split=True))
    return out


def combine(bookings: Sequence[_Booking], kinds: Sequence[str]) -> list[_Booking]:
    """The parameter collectives of one group as the compiler issues them: those of a kind
    in `kinds` that run together (same group of devices, same place in the step) merged into
    one collective of their summed bytes, which pays one latency."""
    merged: dict[tuple, _Booking] = {}
    alone = []
    for b in bookings:
        if b.kind not in kinds:
            alone.append(b)
            continue
        key = dataclasses.replace(b, nbytes=0.0)
        before = merged.get(key)
        merged[key] = b if before is None else dataclasses.replace(
            before, nbytes=before.nbytes + b.nbytes)
    return alone + list(merged.values())


def activation_bytes(tensors: Sequence[Tensor], plan: Plan) -> float:
    """Per-device bytes of activations laid out by the plan's rules (unknown axes whole)."""
    known = {name for name, _ in plan.rules}
    total = 0.0
    for tensor in tensors:
        names = [a if a in known else None for a in tensor.logical_axes]
        total += tensor.nbytes / _size(plan, sum(plan.layout(names, shape=tensor.shape), ()))
    return total


def predict(graph: ModelGraph, plan: Plan, cluster: Cluster,
            options: Options | None = None) -> Predicted:
    """The plan's predicted step time and per-device memory by category. Predicted has no
    field of its own for memory-bound work: it is local work, counted in `compute_s`."""
    options = options or Options()
    compute = communication = temporary = 0.0
    collectives: dict[str, float] = defaultdict(float)
    memory: dict[str, float] = defaultdict(float)
    for group in graph.groups:
        t = group_terms(group, plan, cluster, options)
        compute += t.compute_s + t.memory_s
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
