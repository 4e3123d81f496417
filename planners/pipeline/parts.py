"""A graph cut for pipelining: the groups before, in and after the layer stack, one layer of
the stack at any microbatch, and the cluster one stage sees."""

from __future__ import annotations

import dataclasses

from jaxpar.plan import PlanError
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.graph import Group, ModelGraph, Tensor


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
                               saved_remat=tuple(map(tensor, group.saved_remat)),
                               saved_dots=tuple(map(tensor, group.saved_dots)))


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
                        "`layers` axis (nnx.vmap + nnx.scan) or keep them in an nnx.List of "
                        "identical modules to pipeline them")
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
            flops_fwd=g.flops_fwd - flops, saved=(), saved_remat=(), saved_dots=()))
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
