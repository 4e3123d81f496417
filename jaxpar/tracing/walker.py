"""The jaxpr walker: parameter views, contraction FLOPs and the groups in order of use."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core

from jaxpar.plan import ParamInfo
from jaxpar.planners.graph import Matmul
from jaxpar.primitives import scan_arity
from jaxpar.tracing.names import (
    CONST,
    Names,
    ParamView,
    dot_names,
    merge_names,
    names_of,
    nbytes_of,
    out_names,
    param_view,
    shape_of,
    sub_jaxpr,
)
from jaxpar.tracing.params import path_str


class Walker:
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
        """Refs of `jaxpr`'s outputs given those of its inputs: a ParamView, CONST or the
        Names of an activation."""
        env: dict = dict(zip(jaxpr.invars, ins))
        env.update((v, CONST) for v in jaxpr.constvars)
        get = lambda v: CONST if isinstance(v, core.Literal) else env[v]  # noqa: E731
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
        if n_out == 1 and eqn.invars and isinstance(ins[0], ParamView):
            view = param_view(eqn, ins[0])
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
        sub = sub_jaxpr(eqn)
        if sub is not None:
            return self.walk(sub, ins, mult, scope)
        for ref in ins:
            if isinstance(ref, ParamView):
                self.use(self.group_of[ref.path])
        if all(r is CONST for r in ins):
            return [CONST] * n_out
        return out_names(eqn, [names_of(v, r) for v, r in zip(eqn.invars, ins)])

    def dot(self, eqn: core.JaxprEqn, ins: list, mult: float, scope: str | None) -> Any:
        (contract_l, contract_r), _ = eqn.params["dimension_numbers"]
        lhs, rhs = eqn.invars
        out = eqn.outvars[0]
        flops = 2 * math.prod(out.aval.shape) * mult * math.prod(
            lhs.aval.shape[d] for d in contract_l)
        side = next((i for i, r in enumerate(ins) if isinstance(r, ParamView)), None)
        if side is None:
            self.work.append((self.here(scope, False), flops))
            if ins == [CONST, CONST]:
                return CONST
        else:
            self.matmul(eqn, ins[side], side, flops)
        return dot_names(eqn, [names_of(v, r) for v, r in zip(eqn.invars, ins)])[0]

    def matmul(self, eqn: core.JaxprEqn, p: ParamView, side: int, flops: float) -> None:
        """Record a contraction with parameter (view) `p` as operand `side` of `eqn`."""
        group = self.group_of[p.path]
        self.use(group)
        self.work.append((group, flops))
        contract = eqn.params["dimension_numbers"][0][side]
        names = lambda dims: tuple(n for d in dims for n in p.axes[d])  # noqa: E731
        free = [d for d in range(len(p.axes)) if d not in contract]
        self.matmuls[group].append(Matmul(
            p.path, names(contract), tuple(n for n in names(free) if n != "layers"), flops,
            nbytes_of(eqn.outvars[0]), nbytes_of(eqn.invars[1 - side])))

    def scan(self, eqn: core.JaxprEqn, ins: list, mult: float, scope: str | None) -> list:
        """A scan over a stacked parameter of a group with `repeat` = length is that group's
        layer loop: the body sees one layer's slice and its other work belongs to the group;
        the outputs it stacks gain a leading `layers` dim. Carries keep their initial names
        (and those the body gives them)."""
        p = eqn.params
        (n_const, n_carry), length = scan_arity(p), p["length"]
        xs = ins[n_const + n_carry:]
        lead: str | None = None  # the name of the stacking dim of the outputs
        for ref in xs:
            if (isinstance(ref, ParamView) and ref.axes[:1] == (("layers",),)
                    and self.repeat[self.group_of[ref.path]] == length):
                scope, lead = self.group_of[ref.path], "layers"
                self.use(scope)
                break
        xs = [ParamView(r.path, r.axes[1:]) if isinstance(r, ParamView)
              else r[1:] if isinstance(r, tuple) else r for r in xs]
        carry_vars = eqn.invars[n_const:n_const + n_carry]
        carry = [names_of(v, r) for v, r in zip(carry_vars, ins[n_const:n_const + n_carry])]
        outs = self.walk(p["jaxpr"].jaxpr, ins[:n_const] + carry + xs, mult * length, scope)
        ys = [ParamView(r.path, ((),) + r.axes) if isinstance(r, ParamView)
              else (lead,) + r if isinstance(r, tuple) else r
              for r in outs[n_carry:]]
        return self._carried(eqn.outvars[:n_carry], carry, outs[:n_carry]) + ys

    def while_loop(self, eqn: core.JaxprEqn, ins: list, mult: float,
                   scope: str | None) -> list:
        """A while loop's body runs once as far as the walk knows; its carries as a scan's."""
        p = eqn.params
        start = p["cond_nconsts"] + p["body_nconsts"]
        carry = [names_of(v, r) for v, r in zip(eqn.invars[start:], ins[start:])]
        outs = self.walk(p["body_jaxpr"].jaxpr, ins[p["cond_nconsts"]:start] + carry, mult,
                         scope)
        return self._carried(eqn.outvars, carry, outs)

    @staticmethod
    def _carried(out_vars: list, carry: list[Names], outs: list) -> list[Names]:
        """Names of a loop's final carries: the initial names merged with the body's."""
        return [merge_names(c, names_of(v, r)) for v, c, r in zip(out_vars, carry, outs)]

    def cond(self, eqn: core.JaxprEqn, ins: list, mult: float, scope: str | None) -> list:
        """Only the branch with the most FLOPs counts (the worst case)."""
        def flops(branch: core.ClosedJaxpr) -> float:
            probe = Walker(self.group_of, self.repeat)
            probe.walk(branch.jaxpr, ins[1:], mult, scope)
            return sum(probe.flops().values())

        heaviest = max(eqn.params["branches"], key=flops)
        return self.walk(heaviest.jaxpr, ins[1:], mult, scope)


def walk_jaxpr(fn: Callable, args: tuple, infos: dict[str, ParamInfo], groups: dict[str, str],
          repeat: dict[str, int]) -> tuple[Walker, list, Any]:
    """Trace `fn(params, batch)` to a jaxpr and walk it: the walker, (var, ref) of each
    output and the output's shape tree. Batch inputs are named `batch` in their first dim."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(args[0])[0]]
    ins: list = [ParamView(p, tuple(() if a is None else (a,) for a in infos[p].logical_axes))
                 for p in paths]  # an unnamed dim has no names
    ins += [("batch",) + (None,) * (len(shape_of(v)) - 1) if shape_of(v) else ()
            for v in closed.jaxpr.invars[len(ins):]]
    walker = Walker(groups, repeat)
    outs = walker.walk(closed.jaxpr, ins, 1, None)
    return walker, list(zip(closed.jaxpr.outvars, outs)), shape
