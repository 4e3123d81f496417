"""Cluster: the hardware a plan runs on, as plain numbers (no jax).

Devices are grouped in nodes; links inside a node (NVLink, ICI) and between nodes (NIC,
DCN) have their own bandwidth and latency. Presets come from vendor datasheets; bandwidths
are per device and per direction, in bytes/s; latencies in seconds.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Cluster:
    name: str
    num_nodes: int
    devices_per_node: int
    peak_flops: float
    memory_bytes: float
    intra_node_bandwidth: float
    intra_node_latency: float
    inter_node_bandwidth: float
    inter_node_latency: float
    source: str = "datasheet"

    def __post_init__(self) -> None:
        for field in ("num_nodes", "devices_per_node", "peak_flops", "memory_bytes"):
            if getattr(self, field) <= 0:
                raise ValueError(f"Cluster.{field} must be positive, got {getattr(self, field)}")

    @property
    def num_devices(self) -> int:
        return self.num_nodes * self.devices_per_node

    @property
    def physical_mesh(self) -> dict[str, int]:
        return {"node": self.num_nodes, "device": self.devices_per_node}

    def link(self, group_size: int, stride: int) -> tuple[float, float]:
        """(bandwidth, latency) of a collective over `group_size` devices `stride` apart:
        it stays on the fast links only if the whole group lies within one node."""
        if stride * (group_size - 1) < self.devices_per_node:
            return self.intra_node_bandwidth, self.intra_node_latency
        return self.inter_node_bandwidth, self.inter_node_latency

    def with_nodes(self, num_nodes: int) -> Cluster:
        return dataclasses.replace(self, num_nodes=num_nodes)


def a100_80gb(num_nodes: int = 1) -> Cluster:
    """DGX A100 80GB: 312 TFLOP/s bf16; NVSwitch 600 GB/s bidirectional per GPU;
    8x HDR InfiniBand 200 Gb/s per node, i.e. 25 GB/s per GPU."""
    return Cluster("A100-80GB", num_nodes, 8, 312e12, 80 * GB, 300 * GB, 5e-6, 25 * GB, 10e-6)


def h100_80gb(num_nodes: int = 1) -> Cluster:
    """DGX H100: 989 TFLOP/s bf16 dense; NVLink 4 900 GB/s bidirectional per GPU;
    8x ConnectX-7 400 Gb/s per node, i.e. 50 GB/s per GPU."""
    return Cluster("H100-80GB", num_nodes, 8, 989e12, 80 * GB, 450 * GB, 4e-6, 50 * GB, 8e-6)


def tpu_v4(num_chips: int = 8, num_slices: int = 1) -> Cluster:
    """TPU v4: 275 TFLOP/s bf16, 32 GiB HBM, ICI 2400 Gb/s per chip inside a slice;
    slices talk over the data-centre network (about 6.25 GB/s per chip)."""
    return Cluster("TPU-v4", num_slices, num_chips, 275e12, 32 * GiB, 300 * GB, 2e-6, 6.25 * GB,
                   20e-6)


def tpu_v5e(num_chips: int = 8, num_slices: int = 1) -> Cluster:
    """TPU v5e: 197 TFLOP/s bf16, 16 GB HBM, ICI 1600 Gb/s per chip inside a slice."""
    return Cluster("TPU-v5e", num_slices, num_chips, 197e12, 16 * GB, 200 * GB, 2e-6, 6.25 * GB,
                   20e-6)


PRESETS = {"a100": a100_80gb, "h100": h100_80gb, "tpu-v4": tpu_v4, "tpu-v5e": tpu_v5e}
