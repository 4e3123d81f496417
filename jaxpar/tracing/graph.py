"""Trace a model's loss into a ModelGraph, with shapes only: what the planner knows of it.

A walk over the forward jaxpr finds every contraction and the parameter (view) feeding it;
a walk over the jaxpr of `jax.vjp` finds the residuals autodiff saves for the backward pass.

Attribution: a group is the first component of a parameter path, ordered by first use in
the forward pass. A matmul with a parameter operand belongs to that parameter's group. Other
work (and a residual) belongs to the group of the enclosing layer scan; outside one, to the
group of the parameter it uses, else of the next parameter used (work preparing a layer's
input, such as a norm's statistics, is that layer's), else of the last one (the loss).
Every figure is the total over the forward pass divided by the group's `repeat`: per layer.

Each residual is reported with the logical axis of each of its dims, so the cost model can
lay it out under any plan. Every activation the walk meets carries these names: from the
parameters, from the batch (its first dim is `batch`) and from the model's `constrain` calls
(the vjp is traced under a probe plan that leaves the logical names in the jaxpr's sharding
constraints); they flow forward through the primitives (see `jaxpar.tracing.names.NAME_RULES`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core
from jax.sharding import AbstractMesh, AxisType

from jaxpar import context
from jaxpar.plan import DEFAULT_RULES, REMAT, ParamInfo, Plan
from jaxpar.planners.graph import Group, ModelGraph, Tensor
from jaxpar.tracing.loss import loss_output, probe_loss
from jaxpar.tracing.names import Names, nbytes_of
from jaxpar.tracing.params import LossFn, ModelFn, abstract_model
from jaxpar.tracing.walker import walk_jaxpr


def _probe(infos: dict[str, ParamInfo], remat: str) -> tuple[Plan, jax.sharding.AbstractMesh]:
    """A plan mapping every logical name to a mesh axis of that name, so the model's
    `constrain` calls leave their logical names in the jaxpr's sharding constraints. The
    mesh axes have size 1 (nothing is split; no divisibility checks); the plan says 2 so
    that its rules do not drop out."""
    names = sorted({n for n, _ in DEFAULT_RULES}
                   | {a for i in infos.values() for a in i.logical_axes if a is not None})
    plan = Plan(mesh=tuple((n, 2) for n in names), rules=tuple((n, (n,)) for n in names),
                remat=remat)
    return plan, AbstractMesh((1,) * len(names), tuple(names),
                              axis_types=(AxisType.Auto,) * len(names))


def _saved(loss: Callable, params: dict, batch: Any, infos: dict[str, ParamInfo],
           groups: dict[str, str], repeat: dict[str, int], remat: str
           ) -> dict[str, list[Tensor]]:
    """The residuals `jax.vjp` of the loss keeps, one layer's Tensors per group, traced
    under the probe plan (see `_probe`), so `jaxpar.layer` applies the remat policy `remat`
    as a plan would.
    Parameters, their views and constants are not counted; a residual belongs where the
    work making it does (see the module docstring); a batch input, to the first group."""
    plan, mesh = _probe(infos, remat)
    with jax.sharding.use_abstract_mesh(mesh), context.active(plan, ()):
        walker, outs, shape = walk_jaxpr(lambda p, b: jax.vjp(lambda q: loss(q, b), p),
                                    (params, batch), infos, groups, repeat)
    saved: dict[str, list[Tensor]] = defaultdict(list)
    for var, ref in outs[len(outs) - len(jax.tree.leaves(shape[1])):]:  # vjp_fn's leaves
        if not isinstance(ref, tuple):
            continue
        group = walker.group(walker.made_at.get(var, 0))
        if group is not None:
            saved[group].append(_tensor(var, ref, repeat[group]))
    return saved


def _tensor(var: core.Var, names: Names, repeat: int) -> Tensor:
    """One layer's share of a residual of a group of `repeat` layers: a residual the layer
    scan stacked loses its `layers` dim; any other is spread over the layers (its bytes
    divided by `repeat`). A dim of size 1 is never split, so it has no name."""
    shape, nbytes = tuple(var.aval.shape), nbytes_of(var) / repeat
    if repeat > 1 and names[:1] == ("layers",) and shape[:1] == (repeat,):
        shape, names = shape[1:], names[1:]
    return Tensor(shape, nbytes, tuple(n if d > 1 else None for d, n in zip(shape, names)))


def trace_graph(model_fn: ModelFn, loss_fn: LossFn, batch: Any) -> ModelGraph:
    """The ModelGraph of `loss_fn(model_fn(rngs), batch)`; `batch` holds arrays or
    ShapeDtypeStructs with the batch dimension first. Nothing is allocated."""
    graphdef, params, table, variables = abstract_model(model_fn)
    variables = jax.tree.map(_placeholder, variables.to_pure_dict())
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    infos = {i.path: i for i in table}
    groups = {i.path: i.path.split("/")[0] for i in table}
    members: dict[str, list[ParamInfo]] = defaultdict(list)
    for info in table:
        members[groups[info.path]].append(info)
    repeat = {g: _repeat(ps) for g, ps in members.items()}
    # a list of identical layers, each passed to jaxpar.layer, is priced as a stack
    lists = {g: n for g, ps in members.items() if repeat[g] == 1 and (n := _unrolled(ps)) > 1}
    layered = probe_loss(graphdef, params, loss_fn, batch, _probe(infos, "none")[0],
                         variables).unrolled if lists else frozenset()
    layer_lists = {g: n for g, n in lists.items()
                   if all(p.path in layered for p in members[g])}
    repeat.update({g: n for g, n in layer_lists.items() if n > 1})

    def loss(p: dict, b: Any) -> jax.Array:  # an aux output is not priced
        return loss_output(loss_fn(nnx.merge(graphdef, p, variables), b))[0]

    forward, _, _ = walk_jaxpr(loss, (params, batch), infos, groups, repeat)
    order = forward.order + [g for g in members if g not in forward.order]
    flops = forward.flops()
    saved = {remat: _saved(loss, params, batch, infos, groups, repeat, remat)
             for remat in REMAT}
    leaves = jax.tree.leaves(batch)
    return ModelGraph(
        groups=tuple(Group(
            name=g, repeat=repeat[g], params=_as_stack(members[g], layer_lists.get(g, 1)),
            matmuls=_one_layer(forward.matmuls[g], g, repeat[g], layer_lists.get(g, 1)),
            flops_fwd=flops[g] / repeat[g],
            saved=tuple(saved["none"][g]),
            saved_remat=tuple(saved["full"][g]),
            saved_dots=tuple(saved["dots"][g]),
        ) for g in order),
        batch_size=leaves[0].shape[0] if leaves else 0,
        batch_bytes=sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves),
    )


def _repeat(params: list[ParamInfo]) -> int:
    """Layers of a stacked group: every parameter has `layers` first, all of one size."""
    sizes = {p.shape[0] if p.logical_axes[:1] == ("layers",) else None for p in params}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else 1


def _placeholder(shape: jax.ShapeDtypeStruct) -> jax.Array:
    """A small concrete stand-in for a variable (batch statistic, RNG key) the loss reads:
    a constant of the traced program, which the walk does not count."""
    if jax.dtypes.issubdtype(shape.dtype, jax.dtypes.prng_key):
        key = jax.random.key(0)
        return jax.random.split(key, shape.shape) if shape.shape else key
    return jnp.zeros(shape.shape, shape.dtype)


def _unrolled(params: list[ParamInfo]) -> int:
    """Layers of an unrolled group (a list of layer modules): every path is
    `group/i/rest` for i = 0 .. n - 1, each layer with the same parameters; else 1."""
    layers: dict[str, set] = defaultdict(set)
    for p in params:
        parts = p.path.split("/")
        if len(parts) < 3 or not parts[1].isdigit():
            return 1
        layers[parts[1]].add(("/".join(parts[2:]), p.shape, p.dtype, p.logical_axes))
    first = layers.get("0")
    if sorted(layers, key=int) != [str(i) for i in range(len(layers))] or any(
            one != first for one in layers.values()):
        return 1
    return len(layers)


def _as_stack(params: list[ParamInfo], layers: int) -> tuple[ParamInfo, ...]:
    """A group's parameters as the planner prices them: an unrolled group of `layers` > 1
    as the stack it equals (layer 0's parameters with a leading `layers` axis; the runtime
    gathers and remats each unrolled layer as it does a stack's)."""
    if layers == 1:
        return tuple(params)
    return tuple(dataclasses.replace(p, shape=(layers, *p.shape),
                                     logical_axes=("layers", *p.logical_axes))
                 for p in params if p.path.split("/")[1] == "0")


def _one_layer(matmuls: list, group: str, repeat: int, layers: int) -> tuple:
    """One layer's matmuls: a scan's (counted once, FLOPs over all its trips) divided by
    the trips; an unrolled group's, layer 0's."""
    if layers > 1:
        return tuple(m for m in matmuls if m.param.startswith(f"{group}/0/"))
    return tuple(dataclasses.replace(m, flops=m.flops / repeat) for m in matmuls)
