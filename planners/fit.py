"""Fit the cost model's figures to timed training steps (no jax).

Micro-benchmarks time a matmul, a collective or a memory stream alone. Inside a training
step the same work can cost otherwise: on devices that share host cores a collective waits
at its rendezvous for time-sliced devices, and its bytes compete with everything else the
step moves. `predict` is linear in four reciprocal figures of a Cluster (1 / peak_flops,
the collective latencies, 1 / link bandwidth, 1 / memory_bandwidth), so a plan's predicted
step time is the sum of four terms, each proportional to one of them. Given steps timed
under several plans, `fit_scales` finds the scale of each term that predicts the measured
times best (least squares on relative error, each scale bounded below), and
`scaled` returns the
Cluster whose figures carry those scales: its predictions are the fitted model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import lsq_linear

from jaxpar.plan import Plan
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.cost import Options, group_terms
from jaxpar.planners.graph import ModelGraph

TERMS = ("compute", "latency", "transfer", "memory")
# The least scale of each term. Matmuls and collectives run no faster in a step than alone
# (without the floor a fit may price a term at nothing: compute, and remat with it, or the
# latency of many small collectives). Memory-bound parameter traffic may cost less than its
# isolated time: it streams while devices wait at collectives.
MIN_SCALES = {"compute": 1.0, "latency": 1.0, "transfer": 1.0, "memory": 0.0}


def step_terms(graph: ModelGraph, plan: Plan, cluster: Cluster,
               options: Options | None = None) -> dict[str, float]:
    """The plan's predicted step time split into TERMS (seconds; they add up to
    `predict(...).step_s`): FLOPs at the matmul rate, collective latencies, collective bytes
    over link bandwidth, and memory-bound parameter traffic over memory bandwidth."""
    totals = dict.fromkeys(TERMS, 0.0)
    for group in graph.groups:
        t = group_terms(group, plan, cluster, options)
        totals["compute"] += t.compute_s
        totals["latency"] += t.latency_s
        totals["transfer"] += t.communication_s - t.latency_s
        totals["memory"] += t.memory_s
    return totals


def fit_scales(terms: Sequence[dict[str, float]], seconds: Sequence[float]) -> dict[str, float]:
    """Scales s of TERMS, each at least its MIN_SCALES, minimising the relative error of
    sum_k s_k terms_k against the measured `seconds`."""
    x = np.array([[t[k] for k in TERMS] for t in terms])
    y = np.asarray(seconds, dtype=float)
    if len(y) < len(TERMS):
        raise ValueError(f"fitting {len(TERMS)} scales needs at least {len(TERMS)} timed steps, "
                         f"got {len(y)}")
    lower = [MIN_SCALES[k] for k in TERMS]
    fit = lsq_linear(x / y[:, None], np.ones_like(y), bounds=(lower, np.inf), method="bvls")
    return {k: float(v) if v > 1e-9 else 0.0 for k, v in zip(TERMS, fit.x)}  # 0: not costed


def scaled(cluster: Cluster, scales: dict[str, float]) -> Cluster:
    """`cluster` with every figure carrying its term's scale: the matmul rate divided by the
    compute scale, latencies times the latency scale, bandwidths divided by the transfer
    or memory scale (a scale of 0 makes that bandwidth infinite: the term is not costed)."""
    def over(value: float, scale: float) -> float:
        return value / scale if scale > 0 else math.inf

    lat, bw = scales["latency"], scales["transfer"]
    per_kind = {kind: {"bandwidth": over(f["bandwidth"], bw), "latency": f["latency"] * lat}
                for kind, f in cluster.intra_node_collectives.items()}
    return dataclasses.replace(
        cluster, peak_flops=cluster.peak_flops / scales["compute"],
        intra_node_bandwidth=over(cluster.intra_node_bandwidth, bw),
        inter_node_bandwidth=over(cluster.inter_node_bandwidth, bw),
        intra_node_latency=cluster.intra_node_latency * lat,
        inter_node_latency=cluster.inter_node_latency * lat,
        latency_per_device=cluster.latency_per_device * lat, intra_node_collectives=per_kind,
        memory_bandwidth=over(cluster.memory_bandwidth, scales["memory"]))
