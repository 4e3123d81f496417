"""Logical names through a jaxpr: which dims of an activation or a parameter view carry
which logical axis, propagated primitive by primitive (`NAME_RULES`)."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import operator
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from jax.extend import core

Axes = tuple[tuple[str | None, ...], ...]  # a parameter view: the logical names of each dim
Names = tuple[str | None, ...]  # an activation: each dim's logical name, None if unknown
NameRule = Callable[[core.JaxprEqn, list[Names]], list[Names]]


@dataclasses.dataclass(frozen=True)
class ParamView:
    """A jaxpr value that is (a view of) a parameter: its path and each dim's logical axes."""

    path: str
    axes: Axes


CONST = object()  # a value computed from literals only: free to rematerialize, never saved
IDENTITY = {"convert_element_type", "reduce_precision", "name", "sharding_constraint", "copy",
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


def param_view(eqn: core.JaxprEqn, p: ParamView) -> ParamView | None:
    """The parameter view a layout-only primitive makes of `p` (None if it makes none)."""
    name, params = eqn.primitive.name, eqn.params
    old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if name in IDENTITY:
        axes = p.axes
    elif name == "transpose":
        axes = tuple(p.axes[i] for i in params["permutation"])
    elif name == "squeeze":
        axes = tuple(a for i, a in enumerate(p.axes) if i not in params["dimensions"])
    elif name == "reshape" or (name == "broadcast_in_dim" and math.prod(old) == math.prod(new)):
        axes = _reshape(p.axes, old, new)
    else:
        return None
    return ParamView(p.path, axes)


def shape_of(v: core.Atom) -> tuple[int, ...]:
    return getattr(v.aval, "shape", ())


def names_of(v: core.Atom, ref: Any) -> Names:
    """The activation names of a value: a parameter view's single-name dims keep their name;
    a constant is unnamed."""
    if isinstance(ref, tuple):
        return ref
    if isinstance(ref, ParamView):
        return tuple(a[0] if len(a) == 1 else None for a in ref.axes)
    return (None,) * len(shape_of(v))


def _pick(*candidates: str | None) -> str | None:
    """The one name the candidates give (None if none or if they disagree)."""
    known = set(candidates) - {None}
    return known.pop() if len(known) == 1 else None


def merge_names(*names: Names) -> Names:
    """Per dim, the one name the operands give (see `_pick`)."""
    return tuple(_pick(*c) for c in zip(*names))


def _elementwise(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """Elementwise ops, select, cumulative ops, sorts: operands broadcast to each output
    (same rank, each dim its size or 1; scalars aside) and pass their names of the dims of
    its size. An output the operands do not broadcast to (an unknown primitive) is unnamed."""
    operands = [(n, shape_of(v)) for n, v in zip(ins, eqn.invars) if shape_of(v)]
    outs = []
    for out in map(shape_of, eqn.outvars):
        fits = operands and all(
            len(s) == len(out) and all(a in (1, b) for a, b in zip(s, out)) for _, s in operands)
        outs.append(merge_names(*(tuple(n if a == b else None for n, a, b in zip(names, s, out))
                             for names, s in operands)) if fits else (None,) * len(out))
    return outs


def _positional(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """Slices, pads, concatenations, splits: dim i of each output is dim i of the operands
    of its rank (scalar start indices and padding values drop out)."""
    rank = len(shape_of(eqn.outvars[0]))
    return [merge_names(*(n for n in ins if len(n) == rank))] * len(eqn.outvars)


def _constraint(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """A sharding constraint traced under the probe plan (see `_saved`) names each dim with
    its logical axis: the model's own annotation, so it overrides what came in."""
    spec = tuple(getattr(eqn.params["sharding"], "spec", ()))
    spec += (None,) * (len(ins[0]) - len(spec))
    return [tuple(e if isinstance(e, str) else None for e in spec)]


def _broadcast(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """Operand dims keep their names where they land, unless broadcast from size 1."""
    old, new = shape_of(eqn.invars[0]), shape_of(eqn.outvars[0])
    out: list[str | None] = [None] * len(new)
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if old[i] == new[d]:
            out[d] = ins[0][i]
    return [tuple(out)]


def dot_names(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
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
    op_shape, out_shape = shape_of(eqn.invars[0]), shape_of(eqn.outvars[0])
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


NAME_RULES: dict[str, NameRule] = {
    "sharding_constraint": _constraint,
    "broadcast_in_dim": _broadcast,
    "dot_general": dot_names,
    "gather": _gather,
    "transpose": lambda eqn, ins: [tuple(ins[0][i] for i in eqn.params["permutation"])],
    "reshape": lambda eqn, ins: [_reshape_names(ins[0], shape_of(eqn.invars[0]),
                                                shape_of(eqn.outvars[0]))],
    "squeeze": lambda eqn, ins: [tuple(n for d, n in enumerate(ins[0])
                                       if d not in eqn.params["dimensions"])],
    **dict.fromkeys(("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                     "reduce_or", "reduce_xor", "argmax", "argmin"), _reduce),
    **dict.fromkeys(("slice", "dynamic_slice", "dynamic_update_slice", "pad", "rev",
                     "concatenate", "split"), _positional),
}


def out_names(eqn: core.JaxprEqn, ins: list[Names]) -> list[Names]:
    """The names of a primitive's outputs from its operands' (see `NAME_RULES`; any other
    primitive is treated as elementwise)."""
    return NAME_RULES.get(eqn.primitive.name, _elementwise)(eqn, ins)


def nbytes_of(v: core.Var) -> int:
    return math.prod(v.aval.shape) * v.aval.dtype.itemsize


def sub_jaxpr(eqn: core.JaxprEqn) -> core.Jaxpr | None:
    """The body of a call-like primitive (jit, remat, custom_jvp/vjp, shard_map, ...)."""
    for value in eqn.params.values():
        j = value.jaxpr if isinstance(value, core.ClosedJaxpr) else value
        if (isinstance(j, core.Jaxpr) and len(j.invars) == len(eqn.invars)
                and len(j.outvars) == len(eqn.outvars)):
            return j
    return None
