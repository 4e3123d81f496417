"""Trace a model's loss into a ModelGraph, with shapes only: what the planner knows of it.

A walk over the forward jaxpr finds every contraction and the parameter (view) feeding it;
a walk over the jaxpr of `jax.vjp` finds the residuals autodiff saves for the backward pass.

Attribution: a group is the first component of a parameter path, ordered by first use in
the forward pass. A matmul with a parameter operand belongs to that parameter's group. Other
work (and a residual) belongs to the group of the enclosing layer scan; outside one, to the
group of the parameter it uses, else of the next parameter used (work preparing a layer's
input, such as a norm's statistics, is that layer's), else of the last one (the loss).
Every figure is the total over the forward pass divided by the group's `repeat`: per layer.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import operator
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.extend import core

from jaxpar import context
from jaxpar.plan import DEFAULT_RULES, ParamInfo, Plan
from jaxpar.planners.graph import Group, Matmul, ModelGraph
from jaxpar.trace import ModelFn, abstract_params, path_str

LossFn = Callable[[nnx.Module, Any], jax.Array]
Axes = tuple[tuple[str | None, ...], ...]  # logical names of each dimension of a value


@dataclasses.dataclass(frozen=True)
class _Param:
    """A jaxpr value that is (a view of) a parameter: its path and each dim's logical axes."""

    path: str
    axes: Axes


_CONST = object()  # a value computed from literals only: free to rematerialize, never saved
_IDENTITY = {"convert_element_type", "reduce_precision", "name", "sharding_constraint", "copy",
             "slice", "dynamic_slice"}


def _reshape(axes: Axes, old: tuple[int, ...], new: tuple[int, ...]) -> Axes:
    """Logical axes after a reshape: merged or split dims take the names of their block."""
    cuts = sorted(set(itertools.accumulate(old, operator.mul))
                  & set(itertools.accumulate(new, operator.mul)))
    blocks = lambda shape: [bisect.bisect_left(cuts, c)  # noqa: E731
                            for c in itertools.accumulate(shape, operator.mul)]
    names: dict[int, tuple] = defaultdict(tuple)
    for b, n, size in zip(blocks(old), axes, old):
        names[b] += n if size > 1 else ()
    return tuple(names[b] if size > 1 else () for b, size in zip(blocks(new), new))


def _view(eqn: core.JaxprEqn, p: _Param) -> _Param | None:
    """The parameter view a layout-only primitive makes of `p` (None if it makes none)."""
    name, params = eqn.primitive.name, eqn.params
    old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if name in _IDENTITY:
        axes = p.axes
    elif name == "transpose":
        axes = tuple(p.axes[i] for i in params["permutation"])
    elif name == "squeeze":
        axes = tuple(a for i, a in enumerate(p.axes) if i not in params["dimensions"])
    elif name == "reshape" or (name == "broadcast_in_dim" and math.prod(old) == math.prod(new)):
        axes = _reshape(p.axes, old, new)
    else:
        return None
    return _Param(p.path, axes)


def _nbytes(v: core.Var) -> int:
    return math.prod(v.aval.shape) * v.aval.dtype.itemsize


def _sub_jaxpr(eqn: core.JaxprEqn) -> core.Jaxpr | None:
    """The body of a call-like primitive (jit, remat, custom_jvp/vjp, shard_map, ...)."""
    for value in eqn.params.values():
        j = value.jaxpr if isinstance(value, core.ClosedJaxpr) else value
        if (isinstance(j, core.Jaxpr) and len(j.invars) == len(eqn.invars)
                and len(j.outvars) == len(eqn.outvars)):
            return j
    return None


class _Walker:
    """One pass over a jaxpr: parameter views, contraction FLOPs and groups in use order."""

    def __init__(self, group_of: dict[str, str], repeat: dict[str, int]):
        self.group_of, self.repeat = group_of, repeat
        self.uses: list[str] = []  # the group of every parameter use, in order
        self.work: list[tuple[str | int, float]] = []  # (where, FLOPs) of every contraction
        self.matmuls: dict[str, list[Matmul]] = defaultdict(list)
        self.made_at: dict[core.Var, str | int] = {}

    def use(self, group: str) -> None:
        self.uses.append(group)

    def here(self, scope: str | None, used: bool) -> str | int:
        """Where work belongs: the enclosing layer scan's group, else a parameter use (an
        index into `uses`): the last one if the work used a parameter, else the next one."""
        return scope or (len(self.uses) - 1 if used else len(self.uses))

    def group(self, at: str | int) -> str | None:
        if isinstance(at, str):
            return at
        return self.uses[min(at, len(self.uses) - 1)] if self.uses else None

    @property
    def order(self) -> list[str]:
        return list(dict.fromkeys(self.uses))

    def flops(self) -> dict[str | None, float]:
        totals: dict[str | None, float] = defaultdict(float)
        for at, flops in self.work:
            totals[self.group(at)] += flops
        return totals

    def walk(self, jaxpr: core.Jaxpr, ins: list, mult: float, scope: str | None) -> list:
        """Refs (_Param, _CONST or None) of `jaxpr`'s outputs given those of its inputs."""
        env: dict = dict(zip(jaxpr.invars, ins))
        env.update((v, _CONST) for v in jaxpr.constvars)
        get = lambda v: _CONST if isinstance(v, core.Literal) else env.get(v)  # noqa: E731
        for eqn in jaxpr.eqns:
            before = len(self.uses)
            outs = self.eqn(eqn, [get(v) for v in eqn.invars], mult, scope)
            at = self.here(scope, len(self.uses) > before)
            for v, ref in zip(eqn.outvars, outs):
                env[v] = ref
                self.made_at[v] = at
        return [get(v) for v in jaxpr.outvars]

    def eqn(self, eqn: core.JaxprEqn, ins: list, mult: float, scope: str | None) -> list:
        name, n_out = eqn.primitive.name, len(eqn.outvars)
        if name == "optimization_barrier":
            return ins
        if n_out == 1 and eqn.invars and isinstance(ins[0], _Param):
            view = _view(eqn, ins[0])
            if view is not None:
                return [view]
        if name == "dot_general":
            return [self.dot(eqn, ins, mult, scope)]
        if name == "scan":
            return self.scan(eqn, ins, mult, scope)
        if name == "while":
            p = eqn.params
            consts = ins[p["cond_nconsts"]:p["cond_nconsts"] + p["body_nconsts"]]
            body = p["body_jaxpr"].jaxpr
            self.walk(body, consts + [None] * (len(body.invars) - len(consts)), mult, scope)
            return [None] * n_out
        if name == "cond":
            return self.cond(eqn, ins, mult, scope)
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            return self.walk(sub, ins, mult, scope)
        for ref in ins:
            if isinstance(ref, _Param):
                self.use(self.group_of[ref.path])
        return [_CONST if all(r is _CONST for r in ins) else None] * n_out

    def dot(self, eqn: core.JaxprEqn, ins: list, mult: float, scope: str | None) -> Any:
        (contract_l, contract_r), _ = eqn.params["dimension_numbers"]
        lhs, rhs = eqn.invars
        out = eqn.outvars[0]
        flops = 2 * math.prod(out.aval.shape) * mult * math.prod(
            lhs.aval.shape[d] for d in contract_l)
        side = next((i for i, r in enumerate(ins) if isinstance(r, _Param)), None)
        if side is None:
            self.work.append((self.here(scope, False), flops))
            return _CONST if ins == [_CONST, _CONST] else None
        p, contract = ins[side], (contract_l, contract_r)[side]
        group = self.group_of[p.path]
        self.use(group)
        self.work.append((group, flops))
        names = lambda dims: tuple(n for d in dims for n in p.axes[d])  # noqa: E731
        free = [d for d in range(len(p.axes)) if d not in contract]
        self.matmuls[group].append(Matmul(
            p.path, names(contract), tuple(n for n in names(free) if n != "layers"), flops,
            _nbytes(out), _nbytes(eqn.invars[1 - side])))
        return None

    def scan(self, eqn: core.JaxprEqn, ins: list, mult: float, scope: str | None) -> list:
        """A scan over a stacked parameter of a group with `repeat` = length is that group's
        layer loop: the body sees one layer's slice and its other work belongs to the group."""
        p = eqn.params
        n_const, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
        xs = ins[n_const + n_carry:]
        for ref in xs:
            if (isinstance(ref, _Param) and ref.axes[:1] == (("layers",),)
                    and self.repeat[self.group_of[ref.path]] == length):
                scope = self.group_of[ref.path]
                self.use(scope)
                break
        xs = [_Param(r.path, r.axes[1:]) if isinstance(r, _Param) else r for r in xs]
        outs = self.walk(p["jaxpr"].jaxpr, ins[:n_const] + [None] * n_carry + xs,
                         mult * length, scope)
        ys = [_Param(r.path, ((),) + r.axes) if isinstance(r, _Param) else r
              for r in outs[n_carry:]]
        return [None] * n_carry + ys

    def cond(self, eqn: core.JaxprEqn, ins: list, mult: float, scope: str | None) -> list:
        """Only the branch with the most FLOPs counts (the worst case)."""
        def flops(branch: core.ClosedJaxpr) -> float:
            probe = _Walker(self.group_of, self.repeat)
            probe.walk(branch.jaxpr, ins[1:], mult, scope)
            return sum(probe.flops().values())

        heaviest = max(eqn.params["branches"], key=flops)
        return self.walk(heaviest.jaxpr, ins[1:], mult, scope)


def _walk(fn: Callable, args: tuple, infos: dict[str, ParamInfo], groups: dict[str, str],
          repeat: dict[str, int]) -> tuple[_Walker, list, Any]:
    """Trace `fn(params, batch)` to a jaxpr and walk it: the walker, (var, ref) of each
    output and the output's shape tree."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(args[0])[0]]
    ins = [_Param(p, tuple((a,) for a in infos[p].logical_axes)) for p in paths]
    walker = _Walker(groups, repeat)
    outs = walker.walk(closed.jaxpr, ins + [None] * (len(closed.jaxpr.invars) - len(ins)),
                       1, None)
    return walker, list(zip(closed.jaxpr.outvars, outs)), shape


def _saved_bytes(loss: Callable, params: dict, batch: Any, infos: dict[str, ParamInfo],
                 groups: dict[str, str], repeat: dict[str, int], remat: bool) -> dict:
    """Bytes of the residuals `jax.vjp` of the loss keeps, per group (total over layers),
    traced under a one-device plan so `jaxpar.layer` applies remat as a plan would.
    Parameters, their views and constants are not counted; a residual belongs where the
    work making it does (see the module docstring); a batch input, to the first group."""
    names = {a for i in infos.values() for a in i.logical_axes} - {n for n, _ in DEFAULT_RULES}
    plan = Plan(mesh=(("data", 1),), remat=remat,
                rules=DEFAULT_RULES + tuple((n, ()) for n in sorted(names - {None})))
    with (jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("data",))),
          context.active(plan, ())):
        walker, outs, shape = _walk(lambda p, b: jax.vjp(lambda q: loss(q, b), p),
                                    (params, batch), infos, groups, repeat)
    saved: dict[str | None, float] = defaultdict(float)
    for var, ref in outs[len(outs) - len(jax.tree.leaves(shape[1])):]:  # vjp_fn's leaves
        if ref is None:
            saved[walker.group(walker.made_at.get(var, 0))] += _nbytes(var)
    return saved


def trace_graph(model_fn: ModelFn, loss_fn: LossFn, batch: Any) -> ModelGraph:
    """The ModelGraph of `loss_fn(model_fn(rngs), batch)`; `batch` holds arrays or
    ShapeDtypeStructs with the batch dimension first. Nothing is allocated."""
    graphdef, params, table = abstract_params(model_fn)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    infos = {i.path: i for i in table}
    groups = {i.path: i.path.split("/")[0] for i in table}
    members: dict[str, list[ParamInfo]] = defaultdict(list)
    for info in table:
        members[groups[info.path]].append(info)
    repeat = {g: _repeat(ps) for g, ps in members.items()}

    def loss(p: dict, b: Any) -> jax.Array:
        return loss_fn(nnx.merge(graphdef, p), b)

    forward, _, _ = _walk(loss, (params, batch), infos, groups, repeat)
    order = forward.order + [g for g in members if g not in forward.order]
    flops = forward.flops()
    saved = {remat: _saved_bytes(loss, params, batch, infos, groups, repeat, remat)
             for remat in (False, True)}
    leaves = jax.tree.leaves(batch)
    return ModelGraph(
        groups=tuple(Group(
            name=g, repeat=repeat[g], params=tuple(members[g]),
            matmuls=tuple(dataclasses.replace(m, flops=m.flops / repeat[g])
                          for m in forward.matmuls[g]),
            flops_fwd=flops[g] / repeat[g],
            saved_bytes=saved[False][g] / repeat[g],
            saved_bytes_remat=saved[True][g] / repeat[g],
        ) for g in order),
        batch_size=leaves[0].shape[0] if leaves else 0,
        batch_bytes=sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves),
    )


def _repeat(params: list[ParamInfo]) -> int:
    """Layers of a stacked group: every parameter has `layers` first, all of one size."""
    sizes = {p.shape[0] if p.logical_axes[:1] == ("layers",) else None for p in params}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else 1
