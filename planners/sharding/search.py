"""Sharding planner: the fastest plan that fits in memory, found exactly.

Outer loop: every mesh shape data x fsdp x tensor whose product is the device count, each
ZeRO level, and each way of reducing fsdp gradients that can win on the cluster
(`grad_reductions`); a provably small space (d(N)^2 shapes, 66 for 1024 devices). Inner
problem, per shape: a MILP with HiGHS over the choices that interact through the memory
budget: for every layer group, whether its parameters are split over `fsdp` or
replicated, plus the plan-wide remat policy and microbatch count. A group's cost depends on
the global choices, so there is one binary per (group, fsdp, remat, microbatches)
combination, tied to one-hot global choices; temporaries enter as their maximum over
groups. Minimise the predicted step time subject to the per-device memory budget.

Ties are not left to the solver: the cost model charges each extra microbatch its
tensor-parallel collectives and fsdp gathers, and its gradient accumulation where memory-bound
work is costed; where that leaves an exact tie (a data-parallel plan on a cluster without a
memory bandwidth; "dots" against "none" there, its elementwise recomputation being
memory traffic),
the fewest microbatches and the least recomputing remat policy that fit are taken after
the solve. Remat policies are offered only when some group is a layer stack, the only
place they apply.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from jaxpar.plan import (
    DEFAULT_RULES,
    GRAD_REDUCE,
    MESH_AXES,
    REMAT,
    Alternative,
    Plan,
    PlanError,
    Rules,
)
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.cost import Options, group_variants, is_stacked, predict
from jaxpar.planners.graph import ModelGraph
from jaxpar.planners.units import format_bytes


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


SEARCHED_AXES = ("data", "fsdp", "tensor")  # the mesh axes the sharding search sizes


def mesh_shapes(num_devices: int, axes: Sequence[str] = SEARCHED_AXES
                ) -> list[tuple[tuple[str, int], ...]]:
    """Every factorisation of `num_devices` over the mesh `axes` (in that order), the last
    axis' size varying slowest."""
    if len(axes) <= 1:
        return [tuple((axis, num_devices) for axis in axes)] if axes or num_devices == 1 else []
    return [shape + ((axes[-1], d),) for d in divisors(num_devices)
            for shape in mesh_shapes(num_devices // d, axes[:-1])]


def replicate_over_fsdp(rules: Rules) -> Rules:
    """The rules with `fsdp` dropped for parameters (the batch keeps it)."""
    return tuple((name, axes if name == "batch" else tuple(a for a in axes if a != "fsdp"))
                 for name, axes in rules)


def group_pattern(group: str) -> str:
    """The `group_rules` pattern of a layer group: its name as the whole first component of a
    parameter path, so that a top-level parameter (GPT's `positions`) matches too."""
    return f"^{re.escape(group)}(/|$)"


def pattern_group(pattern: str) -> str:
    """The group name a `group_pattern` was made from (any other pattern as it is)."""
    m = re.fullmatch(r"\^(.+)\(/\|\$\)", pattern)
    return re.sub(r"\\(.)", r"\1", m.group(1)) if m else pattern


def describe(plan: Plan) -> str:
    """A short name: 'dp2+fsdp2+tp2 m4 remat zero1 (embed,positions unsharded)'."""
    parts = [f"{prefix}{plan.axis_size(axis)}" for axis, prefix in MESH_AXES.items()
             if plan.axis_size(axis) > 1] or ["single"]
    name = "+".join(parts)
    if plan.microbatches > 1:
        name += f" m{plan.microbatches}"
    if plan.remat != "none":
        name += " remat" if plan.remat == "full" else f" remat={plan.remat}"
    if plan.zero:
        name += " zero1"
    if plan.grad_reduce != GRAD_REDUCE[0]:
        name += f" grads {plan.grad_reduce}"
    replicated = [pattern_group(pattern) for pattern, _ in plan.group_rules]
    if replicated and plan.axis_size("fsdp") > 1:
        name += f" ({','.join(replicated)} unsharded)"
    return name


@dataclasses.dataclass(frozen=True)
class _Combo:
    group: int
    fsdp: bool
    remat: str
    microbatches: int
    time_s: float
    memory: float
    temporary: float
    params: float


MAX_MICROBATCHES = 16  # gradient accumulation past this rarely pays; a caller may raise it


@dataclasses.dataclass(frozen=True)
class _Solution:
    plan: Plan
    time_s: float
    memory: float
    gap: float


def _combos(graph: ModelGraph, base: Plan, cluster: Cluster, options: Options,
            microbatches: Sequence[int]) -> list[_Combo] | None:
    """Every valid (group, fsdp, remat, microbatches) combination with its cost; None if
    some group has no valid layout on this mesh."""
    fsdp_choices = (True, False) if base.axis_size("fsdp") > 1 else (True,)
    remat_choices = REMAT if any(is_stacked(g) for g in graph.groups) else ("none",)
    combos = []
    for gi, group in enumerate(graph.groups):
        valid = 0
        for fsdp in fsdp_choices:
            rules = () if fsdp else ((group_pattern(group.name),
                                      replicate_over_fsdp(base.rules)),)
            plan = dataclasses.replace(base, group_rules=rules)
            try:
                for p in group.params:
                    plan.check_param(p)
            except PlanError:
                continue
            valid += 1
            variants = list(itertools.product(remat_choices, microbatches))
            for (remat, m), t in zip(variants, group_variants(group, plan, cluster, options,
                                                               variants)):
                time_s = t.compute_s + t.memory_s + t.communication_s
                combos.append(_Combo(gi, fsdp, remat, m, time_s, sum(t.memory.values()),
                                     t.temporary, t.memory["params"]))
        if not valid:
            return None
    return combos


def _solve(graph: ModelGraph, base: Plan, combos: list[_Combo], microbatches: Sequence[int],
           budget: float, options: Options, minimise_memory: bool = False) -> _Solution | None:
    """The MILP for one mesh shape and ZeRO level."""
    fixed_memory = _fixed_memory(graph, base, options)
    n, groups = len(combos), len(graph.groups)
    # variables: y (one per combo), z (one per microbatch count), r (one per remat policy),
    # T (temporaries)
    nz, policies = len(microbatches), sorted({k.remat for k in combos}, key=REMAT.index)
    iz, ir, it = n, n + nz, n + nz + len(policies)
    size = it + 1
    c = np.zeros(size)
    if minimise_memory:
        c[:n] = [k.memory for k in combos]
        c[it] = 1.0
    else:
        c[:n] = [k.time_s for k in combos]
    rows, lo, hi = [], [], []

    def row(coeffs: dict[int, float], lower: float, upper: float) -> None:
        r = np.zeros(size)
        for j, v in coeffs.items():
            r[j] += v
        rows.append(r)
        lo.append(lower)
        hi.append(upper)

    row({iz + j: 1.0 for j in range(nz)}, 1, 1)
    row({ir + j: 1.0 for j in range(len(policies))}, 1, 1)
    for g in range(groups):
        mine = [i for i, k in enumerate(combos) if k.group == g]
        row(dict.fromkeys(mine, 1.0), 1, 1)
        for j, m in enumerate(microbatches):
            row({**{i: 1.0 for i in mine if combos[i].microbatches == m}, iz + j: -1.0}, 0, 0)
        for j, remat in enumerate(policies):
            row({**{i: 1.0 for i in mine if combos[i].remat == remat}, ir + j: -1.0}, 0, 0)
    for i, k in enumerate(combos):  # T >= each group's temporaries, and >= all parameters
        row({i: k.temporary, it: -1.0}, -np.inf, 0)
    row({**{i: k.params for i, k in enumerate(combos)}, it: -1.0}, -np.inf, 0)
    if not minimise_memory:
        row({**{i: k.memory for i, k in enumerate(combos)}, it: 1.0}, -np.inf,
            budget - fixed_memory)
    integrality = np.ones(size)
    integrality[it] = 0
    upper = np.ones(size)
    upper[it] = np.inf
    result = milp(c, integrality=integrality, bounds=Bounds(np.zeros(size), upper),
                  constraints=LinearConstraint(np.array(rows), lo, hi))
    if result.x is None:
        return None
    x = np.round(result.x[:n]).astype(bool)
    chosen = [k for k, on in zip(combos, x) if on]
    if not minimise_memory:
        chosen = _least_work(combos, chosen, budget - fixed_memory)
    m = chosen[0].microbatches
    remat = chosen[0].remat
    rules = tuple((group_pattern(graph.groups[k.group].name), replicate_over_fsdp(base.rules))
                  for k in chosen if not k.fsdp)
    plan = dataclasses.replace(base, remat=remat, microbatches=m, group_rules=rules)
    time_s = sum(k.time_s for k in chosen)
    return _Solution(plan, time_s, _memory(chosen) + fixed_memory, float(result.mip_gap or 0.0))


def _fixed_memory(graph: ModelGraph, base: Plan, options: Options) -> float:
    """Per-device bytes no layout choice changes: the batch shard and the reserve."""
    return graph.batch_bytes / base.data_parallel_size + options.reserve_bytes


def _memory_floor(combos: Sequence[_Combo]) -> float:
    """A lower bound on `_memory` of any choice of one combo per group: each term at its
    least, group by group. Above the budget, the MILP need not run."""
    least: dict[int, tuple[float, float, float]] = {}
    for k in combos:
        memory, temporary, params = least.get(k.group, (math.inf,) * 3)
        least[k.group] = (min(memory, k.memory), min(temporary, k.temporary),
                          min(params, k.params))
    memory, temporary, params = zip(*least.values())
    return sum(memory) + max(max(temporary), sum(params))


def _memory(chosen: Sequence[_Combo]) -> float:
    """Per-device bytes of one combo per group (the batch and reserve aside): everything the
    groups hold, plus temporaries, the larger of one group's and all the parameters."""
    temporary = max(max(k.temporary for k in chosen), sum(k.params for k in chosen))
    return sum(k.memory for k in chosen) + temporary


def _least_work(combos: Sequence[_Combo], chosen: list[_Combo],
               budget: float) -> list[_Combo]:
    """`chosen` with the least recomputing remat policy, then the fewest microbatches, that
    fit `budget` at the same step time. The MILP stops within its relative gap, so an exact
    tie (a plan that costs nothing per extra microbatch, or "dots" against "none") can come
    back with any of them."""
    by_key = {(k.group, k.fsdp, k.remat, k.microbatches): k for k in combos}
    time_s = sum(k.time_s for k in chosen)
    remat, m = chosen[0].remat, chosen[0].microbatches
    for r, fewer_m in itertools.product(REMAT[:REMAT.index(remat) + 1],
                                        sorted({k.microbatches for k in combos})):
        if (r, fewer_m) == (remat, m) or fewer_m > m:
            continue
        fewer = [by_key.get((k.group, k.fsdp, r, fewer_m)) for k in chosen]
        if (None not in fewer and sum(k.time_s for k in fewer) <= time_s * (1 + 1e-9)
                and _memory(fewer) <= budget):
            return fewer
    return chosen


@dataclasses.dataclass(frozen=True)
class _NoFit:
    """A mesh shape and ZeRO level none of whose layouts fits, with what was priced."""
    base: Plan
    combos: list[_Combo]
    microbatches: list[int]


def _search(graph: ModelGraph, cluster: Cluster, budget: float, options: Options,
            max_microbatches: int) -> tuple[list[_Solution], list[_NoFit]]:
    """The best plan of every mesh shape and ZeRO level that fits, and the bases that don't."""
    solutions: list[_Solution] = []
    infeasible: list[_NoFit] = []
    for mesh in mesh_shapes(cluster.num_devices):
        base = Plan(mesh=mesh, rules=DEFAULT_RULES)
        dp = base.data_parallel_size
        if graph.batch_size % dp:
            continue
        micro = [m for m in divisors(graph.batch_size // dp) if m <= max_microbatches]
        for zero, reduce in itertools.product((0, 1) if dp > 1 else (0,),
                                              grad_reductions(base, cluster)):
            base_z = dataclasses.replace(base, zero=zero, grad_reduce=reduce)
            combos = _combos(graph, base_z, cluster, options, micro)
            if combos is None:
                break
            fixed = _fixed_memory(graph, base_z, options)
            found = (None if _memory_floor(combos) + fixed > budget
                     else _solve(graph, base_z, combos, micro, budget, options))
            if found is None:
                infeasible.append(_NoFit(base_z, combos, micro))
            else:
                solutions.append(found)
    return solutions, infeasible


def grad_reductions(base: Plan, cluster: Cluster) -> tuple[str, ...]:
    """The `Plan.grad_reduce` forms worth pricing on `base`'s mesh: all-reduce moves twice
    the bytes of reduce-scatter in as many collectives, so it can win only where the
    compiler merges all-reduces and not reduce-scatters, and only with fsdp."""
    combined = cluster.combined_kinds
    if (base.axis_size("fsdp") > 1 and "all-reduce" in combined
            and "reduce-scatter" not in combined):
        return GRAD_REDUCE
    return GRAD_REDUCE[:1]


def merging_grad_reduce(plan: Plan, cluster: Cluster) -> str:
    """The `grad_reduce` form that sends a layer's fsdp gradients as one collective on
    `cluster`'s compiler: all-reduce where only all-reduces are merged, else reduce-scatter."""
    return grad_reductions(plan, cluster)[-1]


def cheapest_grad_reduce(graph: ModelGraph, plan: Plan, cluster: Cluster,
                         options: Options | None = None) -> Plan:
    """`plan` with the `grad_reduce` form the cost model prices fastest on `cluster` (a tie
    keeps reduce-scatter): the planner's choice for a layout given by hand."""
    return min((dataclasses.replace(plan, grad_reduce=r) for r in grad_reductions(plan, cluster)),
               key=lambda p: predict(graph, p, cluster, options).step_s)


def plan_sharding(graph: ModelGraph, cluster: Cluster, memory_budget: float | None = None,
                  options: Options | None = None, max_microbatches: int = MAX_MICROBATCHES,
                  alternatives: int = 8, suggest_devices: bool = True) -> Plan:
    """The plan with the least predicted step time whose predicted per-device memory fits
    `memory_budget` (default: the cluster's device memory). Raises PlanError naming the
    smallest memory that would fit when nothing does and, with `suggest_devices`, the
    fewest devices (up to 64x as many) that would fit: a search of each larger cluster."""
    budget = cluster.memory_bytes if memory_budget is None else memory_budget
    options = options or Options()
    start = time.perf_counter()
    solutions, infeasible = _search(graph, cluster, budget, options, max_microbatches)
    if not solutions:
        raise PlanError(_no_fit_message(graph, cluster, budget, infeasible, options,
                                        max_microbatches if suggest_devices else None))
    solutions.sort(key=lambda s: s.time_s)
    best = solutions[0]
    plan = dataclasses.replace(best.plan, name=describe(best.plan)).bind(graph.params)
    predicted = dataclasses.replace(predict(graph, plan, cluster, options), gap=best.gap,
                                    source=f"analytic, searched in "
                                           f"{time.perf_counter() - start:.2f} s")
    runners = [Alternative(describe(s.plan), s.time_s, s.memory,
                           f"{s.time_s / best.time_s - 1:+.1%} step time")
               for s in solutions[1:alternatives + 1]]
    runners += [Alternative(describe(no.base), math.nan, math.nan,
                            f"no layout fits {format_bytes(budget)}")
                for no in infeasible[:max(0, alternatives - len(runners))]]
    return dataclasses.replace(plan, predicted=predicted, alternatives=tuple(runners))


def _no_fit_message(graph: ModelGraph, cluster: Cluster, budget: float,
                    infeasible: list[_NoFit], options: Options,
                    max_microbatches: int | None) -> str:
    """Name the smallest per-device memory any plan needs and, given `max_microbatches`,
    the devices that would fit."""
    least, least_plan = math.inf, None
    floors = sorted((_memory_floor(no.combos) + _fixed_memory(graph, no.base, options), i, no)
                    for i, no in enumerate(infeasible))
    for floor, _, no in floors:
        if floor >= least:  # sorted: no later base can need less
            break
        found = _solve(graph, no.base, no.combos, no.microbatches, budget, options,
                       minimise_memory=True)
        if found and found.memory < least:
            least, least_plan = found.memory, found.plan
    if least_plan is None:
        return (f"no mesh of {cluster.num_devices} devices can lay out this model with batch "
                f"{graph.batch_size}; change the batch size or the device count")
    more = ""
    for factor in (2, 4, 8, 16, 32, 64) if max_microbatches is not None else ():
        bigger = dataclasses.replace(cluster, num_nodes=cluster.num_nodes * factor)
        if _search(graph, bigger, budget, options, max_microbatches)[0]:
            more = f", or use >= {bigger.num_devices} devices"
            break
    return (f"no plan fits: the smallest needs {format_bytes(least)} per device "
            f"({describe(least_plan)}); the budget is {format_bytes(budget)}; raise the "
            f"budget to {format_bytes(least)}{more}")
