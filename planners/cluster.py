"""Cluster: the hardware a plan runs on, as plain numbers (no jax).

Devices are grouped in nodes; links inside a node (NVLink, ICI) and between nodes (NIC,
DCN) have their own bandwidth and latency. Presets come from vendor datasheets; bandwidths
are per device and per direction, in bytes/s; latencies in seconds.
"""

from __future__ import annotations

import dataclasses
import math

GB = 1e9
GiB = 2**30

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """`memory_bandwidth`: bytes/s one device streams through its memory while every device
    is busy (inf: memory-bound work is not costed). `intra_node_collectives`: measured
    {"bandwidth", "latency"} per collective kind inside a node; a kind absent from it uses
    `intra_node_bandwidth` / `intra_node_latency`. `latency_per_device`: the latency each
    participant of a collective adds beyond the first (a rendezvous waits for every one; on
    devices that share host cores that is measurable, `calibrate()` fits it; datasheets: 0).
    `dispatch_latency`: host seconds to launch one jitted program, which the MPMD pipeline
    pays once per op from one Python thread; no datasheet gives it, so the presets say 0
    (dispatch not priced) and `calibrate()` measures it. `combined_kinds`: the collective
    kinds the compiler merges when they are independent (a layer's parameter collectives),
    priced as one collective per layer; read off the local compiler (`local_cluster()`;
    XLA's CPU backend merges all-reduces only), none for the presets (each priced alone)."""

    name: str
    num_nodes: int
    devices_per_node: int
    peak_flops: float
    memory_bytes: float
    intra_node_bandwidth: float
    intra_node_latency: float
    inter_node_bandwidth: float
    inter_node_latency: float
    memory_bandwidth: float = math.inf
    latency_per_device: float = 0.0
    dispatch_latency: float = 0.0
    intra_node_collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    combined_kinds: tuple[str, ...] = ()
    source: str = "datasheet"

    def __post_init__(self) -> None:
        for field in ("num_nodes", "devices_per_node", "peak_flops", "memory_bytes",
                      "memory_bandwidth"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Cluster.{field} must be positive, got {getattr(self, field)}")
        for field in ("latency_per_device", "dispatch_latency"):
            if getattr(self, field) < 0:
                raise ValueError(f"Cluster.{field} must be >= 0, got {getattr(self, field)}")
        object.__setattr__(self, "combined_kinds", tuple(self.combined_kinds))  # from JSON
        for field in ("intra_node_collectives", "combined_kinds"):
            unknown = set(getattr(self, field)) - set(COLLECTIVE_KINDS)
            if unknown:
                raise ValueError(f"Cluster.{field} has unknown kinds {sorted(unknown)}; "
                                 f"use {', '.join(COLLECTIVE_KINDS)}")

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.devices_per_node

    @property
    def physical_mesh(self) -> dict[str, int]:
        return {"node": self.num_nodes, "device": self.devices_per_node}

    def link(self, group_size: int, stride: int, kind: str | None = None,
             span: int | None = None) -> tuple[float, float]:
        """(bandwidth, latency) of a collective of `kind` over `group_size` devices `stride`
        apart (or spread over `span + 1` consecutive device ids, for a group over several mesh
        axes): it stays on the fast links only if the whole group lies within one node, where
        the kind's own measured figures apply if there are any. The latency grows by
        `latency_per_device` per participant beyond the first."""
        span = stride * (group_size - 1) if span is None else span
        extra = self.latency_per_device * (group_size - 1)
        if span >= self.devices_per_node:
            return self.inter_node_bandwidth, self.inter_node_latency + extra
        figures = self.intra_node_collectives.get(kind)
        if figures:
            return figures["bandwidth"], figures["latency"] + extra
        return self.intra_node_bandwidth, self.intra_node_latency + extra

    def with_nodes(self, num_nodes: int) -> Cluster:
        return dataclasses.replace(self, num_nodes=num_nodes)


def a100_80gb(num_nodes: int = 1) -> Cluster:
    """DGX A100 80GB: 312 TFLOP/s bf16, HBM2e 2.0 TB/s; NVSwitch 600 GB/s bidirectional per
    GPU; 8x HDR InfiniBand 200 Gb/s per node, i.e. 25 GB/s per GPU."""
    return Cluster("A100-80GB", num_nodes, 8, 312e12, 80 * GB, 300 * GB, 5e-6, 25 * GB, 10e-6,
                   memory_bandwidth=2.0e12)


def h100_80gb(num_nodes: int = 1) -> Cluster:
    """DGX H100: 989 TFLOP/s bf16 dense, HBM3 3.35 TB/s; NVLink 4 900 GB/s bidirectional per
    GPU; 8x ConnectX-7 400 Gb/s per node, i.e. 50 GB/s per GPU."""
    return Cluster("H100-80GB", num_nodes, 8, 989e12, 80 * GB, 450 * GB, 4e-6, 50 * GB, 8e-6,
                   memory_bandwidth=3.35e12)


def tpu_v4(num_chips: int = 8, num_slices: int = 1) -> Cluster:
    """TPU v4: 275 TFLOP/s bf16, 32 GiB HBM at 1.2 TB/s, ICI 2400 Gb/s per chip inside a
    slice; slices talk over the data-centre network (about 6.25 GB/s per chip)."""
    return Cluster("TPU-v4", num_slices, num_chips, 275e12, 32 * GiB, 300 * GB, 2e-6, 6.25 * GB,
                   20e-6, memory_bandwidth=1.2e12)


def tpu_v5e(num_chips: int = 8, num_slices: int = 1) -> Cluster:
    """TPU v5e: 197 TFLOP/s bf16, 16 GB HBM at 819 GB/s, ICI 1600 Gb/s per chip inside a
    slice."""
    return Cluster("TPU-v5e", num_slices, num_chips, 197e12, 16 * GB, 200 * GB, 2e-6, 6.25 * GB,
                   20e-6, memory_bandwidth=8.2e11)


PRESETS = {"a100": a100_80gb, "h100": h100_80gb, "tpu-v4": tpu_v4, "tpu-v5e": tpu_v5e}
