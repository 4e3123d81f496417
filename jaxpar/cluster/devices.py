"""The devices jaxpar runs on, described as a `Cluster`."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxpar.hlo import collectives
from jaxpar.planners.cluster import Cluster, a100_80gb, h100_80gb, tpu_v4, tpu_v5e

_KNOWN_KINDS = {"A100": a100_80gb, "H100": h100_80gb, "TPU v4": tpu_v4, "TPU v5": tpu_v5e}


def local_cluster(devices: Sequence[jax.Device] | None = None) -> Cluster:
    """A Cluster for the local devices: datasheet figures for known accelerators; for
    anything else (the CPU) the datasheet fields stay nominal until `calibrate()` measures
    them."""
    devices = list(jax.devices() if devices is None else devices)
    kind = devices[0].device_kind
    nodes = len({d.process_index for d in devices})
    per_node = len(devices) // nodes
    combined = combined_kinds(tuple(devices))
    for key, preset in _KNOWN_KINDS.items():
        if key in kind:
            base = preset(per_node) if key.startswith("TPU") else preset(nodes)
            return dataclasses.replace(base, name=kind, num_nodes=nodes,
                                       devices_per_node=per_node, combined_kinds=combined)
    stats = devices[0].memory_stats() or {}
    memory = stats.get("bytes_limit") or _host_memory_bytes() / len(devices)
    return Cluster(kind, nodes, per_node, peak_flops=1e11, memory_bytes=memory,
                   intra_node_bandwidth=1e10, intra_node_latency=1e-5,
                   inter_node_bandwidth=1e9, inter_node_latency=1e-4,
                   combined_kinds=combined, source="nominal")


@functools.cache
def combined_kinds(devices: tuple[jax.Device, ...]) -> tuple[str, ...]:
    """The collective kinds the compiler for `devices` merges when independent: read off a
    compiled program holding two independent collectives of each kind (merged, they are one
    op with two results)."""
    if len(devices) < 2:
        return ()
    mesh = jax.sharding.Mesh(devices, ("d",))
    kinds = {"all-reduce": lambda x: jax.lax.psum(x, "d"),
             "all-gather": lambda x: jax.lax.all_gather(x, "d", tiled=True),
             "reduce-scatter": lambda x: jax.lax.psum_scatter(x, "d", tiled=True)}

    def body(a: jax.Array, b: jax.Array) -> list[jax.Array]:
        return [op(x) for op in kinds.values() for x in (a, b)]

    spec = PartitionSpec("d")
    program = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec),
                                    out_specs=[spec] * 2 * len(kinds), check_vma=False))
    n = len(devices) * len(devices)
    text = program.lower(jnp.zeros(n), jnp.ones(n)).compile().as_text()
    ops = collectives(text)
    return tuple(kind for kind in kinds if sum(op.kind == kind for op in ops) == 1)


def _host_memory_bytes() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
