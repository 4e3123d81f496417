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
constraints); they flow forward through the primitives (see `_NAME_RULES`).
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
from jaxpar.planners.graph import Group, Matmul, ModelGraph, Tensor
from jaxpar.tracing.params import ModelFn, abstract_params, path_str

LossFn = Callable[[nnx.Module, Any], jax.Array]
Axes = tuple[tuple[str | None, ...], ...]  # a parameter view: the logical names of each dim
Names = tuple[str | None, ...]  # an activation: each dim's logical name, None if unknown
NameRule = Callable[[core.JaxprEqn, list[Names]], list[Names]]


@dataclasses.dataclass(frozen=True)
class _Param:
    """A jaxpr value that is (a view of) a parameter: its path and each dim's logical axes."""

    path: str
    axes: Axes


_CONST = object()  # a value computed from literals only: free to rematerialize, never saved
_IDENTITY = {"convert_element_type", "reduce_precision", "name", "sharding_constraint", "copy",
             "slice", "dynamic_slice"}


def _blocks(old: tuple[int, ...], new: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Which block each dim of a reshape's input and output falls in: a block is a run of
    dims between the cuts (cumulative sizes) both shapes share, so dims of one block are
    merged or split into each other and dims of different blocks are unrelated."""
    cuts = sorted(set(itertools.accumulate(old, operator.mul))
                  & set(itertools.accumulate(new, operator.mul)))
    index = lambda shape: [bisect.bisect_left(cuts, c)  # noqa: E731
                           for c in itertools.accumulate(shape, operator.mul)]
    return index(old), index(new)


def _reshape(axes: Axes, old: tuple[int, ...], new: tuple[int, ...]) -> Axes:
    """Logical axes after a reshape: merged or split dims take the names of their block."""
    old_blocks, new_blocks = _blocks(old, new)
    names: dict[int, tuple] = defaultdict(tuple)
    for b, n, size in zip(old_blocks, axes, old):
        names[b] += n if size > 1 else ()
    return tuple(names[b] if size > 1 else () for b, size in zip(new_blocks, new))


def _reshape_names(names: Names, old: tuple[int, ...], new: tuple[int, ...]) -> Names:
    """Activation names after a reshape: a block with one named input dim passes its name
    to its first output dim of size > 1 (the major part, as a split dim's layout splits);
    a block merging several named dims is unnamed."""
    old_blocks, new_blocks = _blocks(old, new)
    named: dict[int, list[str]] = defaultdict(list)
    for b, n, size in zip(old_blocks, names, old):
        if n is not None and size > 1:
            named[b].append(n)
    out: list[str | None] = []
    for d, (b, size) in enumerate(zip(new_blocks, new)):
        first = size > 1 and all(s == 1 for c, s in zip(new_blocks[:d], new) if c == b)
        out.append(named[b][0] if first and len(named[b]) == 1 else None)
    return tuple(out)


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


def _shape(v: core.Atom) -> tuple[int, ...]:
    return getattr(v.aval, "shape", ())


def _names(v: core.Atom, ref: Any) -> Names:
    """The activation names of a value: a parameter view's single-name dims keep their name;
    a constant is unnamed."""
    if isinstance(ref, tuple):
        return ref
    if isinstance(ref, _Param):
        return tuple(a[0] if len(a) == 1 else None for a in ref.axes)
    return (None,) * len(_shape(v))


def _pick(*candidates: str | None) -> str | None:
    """The one name the candidates give (None if none or if they disagree)."""
    known = set(candidates) - {None}
    return known.pop() if len(known) == 1 else None


def _merge(*names: Names) -> Names:
    """Per dim, the one name the operands give (see `_pick`)."""
    return tuple(_pick(*c) for c in zip(*names))


def _elementwise(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """Elementwise ops, select, cumulative ops, sorts: operands broadcast to each output
    (same rank, each dim its size or 1; scalars aside) and pass their names of the dims of
    its size. An output the operands do not broadcast to (an unknown primitive) is unnamed."""
    operands = [(n, _shape(v)) for n, v in zip(ins, eqn.invars) if _shape(v)]
    outs = []
    for out in map(_shape, eqn.outvars):
        fits = operands and all(
            len(s) == len(out) and all(a in (1, b) for a, b in zip(s, out)) for _, s in operands)
        outs.append(_merge(*(tuple(n if a == b else None for n, a, b in zip(names, s, out))
                             for names, s in operands)) if fits else (None,) * len(out))
    return outs


def _positional(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """Slices, pads, concatenations, splits: dim i of each output is dim i of the operands
    of its rank (scalar start indices and padding values drop out)."""
    rank = len(_shape(eqn.outvars[0]))
    return [_merge(*(n for n in ins if len(n) == rank))] * len(eqn.outvars)


def _constraint(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """A sharding constraint traced under the probe plan (see `_saved`) names each dim with
    its logical axis: the model's own annotation, so it overrides what came in."""
    spec = tuple(getattr(eqn.params["sharding"], "spec", ()))
    spec += (None,) * (len(ins[0]) - len(spec))
    return [tuple(e if isinstance(e, str) else None for e in spec)]


def _broadcast(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """Operand dims keep their names where they land, unless broadcast from size 1."""
    old, new = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    out: list[str | None] = [None] * len(new)
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if old[i] == new[d]:
            out[d] = ins[0][i]
    return [tuple(out)]


def _dot(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """dot_general's output: batch dims, then the lhs's free dims, then the rhs's."""
    (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    free = lambda names, drop: [n for d, n in enumerate(names) if d not in drop]  # noqa: E731
    batch = [_pick(lhs[i], rhs[j]) for i, j in zip(batch_l, batch_r)]
    return [tuple(batch + free(lhs, contract_l + batch_l) + free(rhs, contract_r + batch_r))]


def _gather(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """Offset dims are the operand's uncollapsed dims (named if taken whole, as an embedding
    row); the others are the indices' dims (the last holds index vectors), merged with the
    operand's batching dims they index."""
    (operand, indices), dn = ins, eqn.params["dimension_numbers"]
    op_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    skipped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    kept = iter(d for d in range(len(operand)) if d not in skipped)
    batching = dict(zip(dn.start_indices_batching_dims, dn.operand_batching_dims))
    index_dims = iter(range(len(indices) - 1))
    out: list[str | None] = []
    for d, size in enumerate(out_shape):
        if d in dn.offset_dims:
            k = next(kept)
            out.append(operand[k] if op_shape[k] == size else None)
        else:
            i = next(index_dims)
            out.append(_pick(indices[i], operand[batching[i]] if i in batching else None))
    return [tuple(out)]


def _reduce(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    drop = set(eqn.params["axes"])
    return [tuple(n for d, n in enumerate(ins[0]) if d not in drop)] * len(eqn.outvars)


_NAME_RULES: dict[str, NameRule] = {
    "sharding_constraint": _constraint,
    "broadcast_in_dim": _broadcast,
    "dot_general": _dot,
    "gather": _gather,
    "transpose": lambda eqn, ins: [tuple(ins[0][i] for i in eqn.params["permutation"])],
    "reshape": lambda eqn, ins: [_reshape_names(ins[0], _shape(eqn.invars[0]),
                                                _shape(eqn.outvars[0]))],
    "squeeze": lambda eqn, ins: [tuple(n for d, n in enumerate(ins[0])
                                       if d not in eqn.params["dimensions"])],
    **dict.fromkeys(("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                     "reduce_or", "reduce_xor", "argmax", "argmin"), _reduce),
    **dict.fromkeys(("slice", "dynamic_slice", "dynamic_update_slice", "pad", "rev",
                     "concatenate", "split"), _positional),
}


def _out_names(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """The names of a primitive's outputs from its operands' (see `_NAME_RULES`; any other
    primitive is treated as elementwise)."""
    return _NAME_RULES.get(eqn.primitive.name, _elementwise)(eqn, ins)


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
        """Refs of `jaxpr`'s outputs given those of its inputs: a _Param, _CONST or the
        Names of an activation."""
        env: dict = dict(zip(jaxpr.invars, ins))
        env.update((v, _CONST) for v in jaxpr.constvars)
        get = lambda v: _CONST if isinstance(v, core.Literal) else env[v]  # noqa: E731
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
            return self.while_loop(eqn, ins, mult, scope)
        if name == "cond":
            return self.cond(eqn, ins, mult, scope)
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            return self.walk(sub, ins, mult, scope)
        for ref in ins:
            if isinstance(ref, _Param):
                self.use(self.group_of[ref.path])
        if all(r is _CONST for r in ins):
            return [_CONST] * n_out
        return _out_names(eqn, [_names(v, r) for v, r in zip(eqn.invars, ins)])

    def dot(self, eqn: core.JaxprEqn, ins: list, mult: float, scope: str | None) -> Any:
        (contract_l, contract_r), _ = eqn.params["dimension_numbers"]
        lhs, rhs = eqn.invars
        out = eqn.outvars[0]
        flops = 2 * math.prod(out.aval.shape) * mult * math.prod(
            lhs.aval.shape[d] for d in contract_l)
        side = next((i for i, r in enumerate(ins) if isinstance(r, _Param)), None)
        if side is None:
            self.work.append((self.here(scope, False), flops))
            if ins == [_CONST, _CONST]:
                return _CONST
        else:
            self.matmul(eqn, ins[side], side, flops)
        return _dot(eqn, [_names(v, r) for v, r in zip(eqn.invars, ins)])[0]

    def matmul(self, eqn: core.JaxprEqn, p: _Param, side: int, flops: float) -> None:
        """Record a contraction with parameter (view) `p` as operand `side` of `eqn`."""
        group = self.group_of[p.path]
        self.use(group)
        self.work.append((group, flops))
        contract = eqn.params["dimension_numbers"][0][side]
        names = lambda dims: tuple(n for d in dims for n in p.axes[d])  # noqa: E731
        free = [d for d in range(len(p.axes)) if d not in contract]
        self.matmuls[group].append(Matmul(
            p.path, names(contract), tuple(n for n in names(free) if n != "layers"), flops,
            _nbytes(eqn.outvars[0]), _nbytes(eqn.invars[1 - side])))

    def scan(self, eqn: core.JaxprEqn, ins: list, mult: float, scope: str | None) -> list:
        """A scan over a stacked parameter of a group with `repeat` = length is that group's
        layer loop: the body sees one layer's slice and its other work belongs to the group;
        the outputs it stacks gain a leading `layers` dim. Carries keep their initial names
        (and those the body gives them)."""
        p = eqn.params
        n_const, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
        xs = ins[n_const + n_carry:]
        lead: str | None = None  # the name of the stacking dim of the outputs
        for ref in xs:
            if (isinstance(ref, _Param) and ref.axes[:1] == (("layers",),)
                    and self.repeat[self.group_of[ref.path]] == length):
                scope, lead = self.group_of[ref.path], "layers"
                self.use(scope)
                break
        xs = [_Param(r.path, r.axes[1:]) if isinstance(r, _Param)
              else r[1:] if isinstance(r, tuple) else r for r in xs]
        carry_vars = eqn.invars[n_const:n_const + n_carry]
        carry = [_names(v, r) for v, r in zip(carry_vars, ins[n_const:n_const + n_carry])]
        outs = self.walk(p["jaxpr"].jaxpr, ins[:n_const] + carry + xs, mult * length, scope)
        ys = [_Param(r.path, ((),) + r.axes) if isinstance(r, _Param)
              else (lead,) + r if isinstance(r, tuple) else r
              for r in outs[n_carry:]]
        return self._carried(eqn.outvars[:n_carry], carry, outs[:n_carry]) + ys

    def while_loop(self, eqn: core.JaxprEqn, ins: list, mult: float,
                   scope: str | None) -> list:
        """A while loop's body runs once as far as the walk knows; its carries as a scan's."""
        p = eqn.params
        start = p["cond_nconsts"] + p["body_nconsts"]
        carry = [_names(v, r) for v, r in zip(eqn.invars[start:], ins[start:])]
        outs = self.walk(p["body_jaxpr"].jaxpr, ins[p["cond_nconsts"]:start] + carry, mult,
                         scope)
        return self._carried(eqn.outvars, carry, outs)

    @staticmethod
    def _carried(out_vars: list, carry: list[Names], outs: list) -> list[Names]:
        """Names of a loop's final carries: the initial names merged with the body's."""
        return [_merge(c, _names(v, r)) for v, c, r in zip(out_vars, carry, outs)]

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
    output and the output's shape tree. Batch inputs are named `batch` in their first dim."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(args[0])[0]]
    ins: list = [_Param(p, tuple((a,) for a in infos[p].logical_axes)) for p in paths]
    ins += [("batch",) + (None,) * (len(_shape(v)) - 1) if _shape(v) else ()
            for v in closed.jaxpr.invars[len(ins):]]
    walker = _Walker(groups, repeat)
    outs = walker.walk(closed.jaxpr, ins, 1, None)
    return walker, list(zip(closed.jaxpr.outvars, outs)), shape


def _probe(infos: dict[str, ParamInfo], remat: bool) -> tuple[Plan, jax.sharding.AbstractMesh]:
    """A plan mapping every logical name to a mesh axis of that name, so the model's
    `constrain` calls leave their logical names in the jaxpr's sharding constraints. The
    mesh axes have size 1 (nothing is split; no divisibility checks); the plan says 2 so
    that its rules do not drop out."""
    names = sorted({n for n, _ in DEFAULT_RULES}
                   | {a for i in infos.values() for a in i.logical_axes if a is not None})
    plan = Plan(mesh=tuple((n, 2) for n in names), rules=tuple((n, (n,)) for n in names),
                remat=remat)
    return plan, jax.sharding.AbstractMesh((1,) * len(names), tuple(names))


def _saved(loss: Callable, params: dict, batch: Any, infos: dict[str, ParamInfo],
           groups: dict[str, str], repeat: dict[str, int], remat: bool
           ) -> dict[str, list[Tensor]]:
    """The residuals `jax.vjp` of the loss keeps, one layer's Tensors per group, traced
    under the probe plan (see `_probe`), so `jaxpar.layer` applies remat as a plan would.
    Parameters, their views and constants are not counted; a residual belongs where the
    work making it does (see the module docstring); a batch input, to the first group."""
    plan, mesh = _probe(infos, remat)
    with jax.sharding.use_abstract_mesh(mesh), context.active(plan, ()):
        walker, outs, shape = _walk(lambda p, b: jax.vjp(lambda q: loss(q, b), p),
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
    shape, nbytes = tuple(var.aval.shape), _nbytes(var) / repeat
    if repeat > 1 and names[:1] == ("layers",) and shape[:1] == (repeat,):
        shape, names = shape[1:], names[1:]
    return Tensor(shape, nbytes, tuple(n if d > 1 else None for d, n in zip(shape, names)))


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
    saved = {remat: _saved(loss, params, batch, infos, groups, repeat, remat)
             for remat in (False, True)}
    leaves = jax.tree.leaves(batch)
    return ModelGraph(
        groups=tuple(Group(
            name=g, repeat=repeat[g], params=tuple(members[g]),
            matmuls=tuple(dataclasses.replace(m, flops=m.flops / repeat[g])
                          for m in forward.matmuls[g]),
            flops_fwd=flops[g] / repeat[g],
            saved=tuple(saved[False][g]),
            saved_remat=tuple(saved[True][g]),
        ) for g in order),
        batch_size=leaves[0].shape[0] if leaves else 0,
        batch_bytes=sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves),
    )


def _repeat(params: list[ParamInfo]) -> int:
    """Layers of a stacked group: every parameter has `layers` first, all of one size."""
    sizes = {p.shape[0] if p.logical_axes[:1] == ("layers",) else None for p in params}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else 1
