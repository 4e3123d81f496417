"""A chunk's backward pass split in two, as zero-bubble schedules run it: B computes the input
gradient, W the weight gradient, and B hands W the intermediate cotangents W needs, so
nothing is computed twice.

jax has no such transform: a pullback computes both gradients in one pass, and asking it for
the weight gradient alone recomputes the cotangent chain through the chunk. `split` traces
the pullback to a jaxpr with calls and short loops inlined (a `jit`, a `remat`, the `scan`
over a chunk's layers; longer loops stay whole), then partitions its equations: B keeps
those the input gradient needs; W keeps the rest of those the weight gradient needs, and
takes as inputs the values of B's equations they read (the handoff), except values B
computed from the residuals alone with cheap (elementwise, layout) equations: W recomputes
those, so the handoff holds cotangents and matmul results only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core

from jaxpar.primitives import scan_arity

# loops of at most this many steps are unrolled, so that W can take over their per-step
# weight-gradient work; a longer loop stays one equation, recomputed in W if W needs it
MAX_UNROLL = 64
_CALLS = ("jit", "pjit", "closed_call", "call", "checkpoint", "remat2")


def _inlined(jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list:
    """Evaluate `jaxpr` in the current trace with its calls and short scans inlined."""
    env: dict[core.Var, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, core.Literal) else env[v]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name, params = eqn.primitive.name, eqn.params
        if name in _CALLS:
            body = params.get("jaxpr", params.get("call_jaxpr"))
            outs = (_inlined(body.jaxpr, body.consts, ins) if isinstance(body, core.ClosedJaxpr)
                    else _inlined(body, (), ins))
        elif name == "scan" and 0 < params["length"] <= MAX_UNROLL:
            outs = _unrolled_scan(ins, params)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, core.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _unrolled_scan(args: list, params: dict) -> list:
    jaxpr, length, reverse = params["jaxpr"], params["length"], params["reverse"]
    num_consts, num_carry = scan_arity(params)
    consts, carry = args[:num_consts], args[num_consts:num_consts + num_carry]
    xs = args[num_consts + num_carry:]
    ys: list[list] = [None] * length
    for i in reversed(range(length)) if reverse else range(length):
        out = _inlined(jaxpr.jaxpr, jaxpr.consts, [*consts, *carry, *(x[i] for x in xs)])
        carry, ys[i] = out[:num_carry], out[num_carry:]
    num_ys = len(jaxpr.jaxpr.outvars) - num_carry
    stacked = [jnp.stack([y[k] for y in ys]) for k in range(num_ys)]
    return [*carry, *stacked]


def inlined(fn: Callable[..., Any], args: Sequence[Any]) -> list:
    """The flat outputs of `fn(*args)`, traced with its calls and short loops inlined."""
    closed = jax.make_jaxpr(lambda *a: jax.tree.leaves(fn(*a)))(*args)
    return _inlined(closed.jaxpr, closed.consts, args)


def _costly(eqn: core.JaxprEqn) -> bool:
    """Whether W should take `eqn`'s result from B rather than compute it again: a matmul,
    a convolution, an equation with effects, or one holding jaxprs (a loop or branches left
    whole)."""
    def holds_jaxpr(v: Any) -> bool:
        if isinstance(v, tuple | list):
            return any(map(holds_jaxpr, v))
        return isinstance(v, core.Jaxpr | core.ClosedJaxpr)

    return (eqn.primitive.name in ("dot_general", "conv_general_dilated") or bool(eqn.effects)
            or any(map(holds_jaxpr, eqn.params.values())))


def _needed(eqns: Sequence[core.JaxprEqn], outvars: Sequence[Any]) -> list[core.JaxprEqn]:
    """The equations computing `outvars`, in order."""
    live = {v for v in outvars if isinstance(v, core.Var)}
    kept = []
    for eqn in reversed(eqns):
        if any(v in live for v in eqn.outvars) or eqn.effects:
            kept.append(eqn)
            live.update(v for v in eqn.invars if isinstance(v, core.Var))
    return kept[::-1]


@dataclasses.dataclass(frozen=True)
class Stash:
    """What a pipeline stashes of a pullback `jax.vjp` returned: its residual leaves, minus
    those that are leaves of the inputs it was taken at (weights, the batch: the runtime has
    them anyway and hands them back). `source[i]`: the input leaf residual i is, or None
    (stashed). The leaves are matched by identity while tracing; the same code traced again
    gives the same positions."""

    tree: Any
    source: tuple[int | None, ...]

    @classmethod
    def of(cls, pullback: Any, inputs: Any) -> tuple[Stash, list]:
        """The layout of `pullback` at `inputs`, and the residuals to stash."""
        leaves, tree = jax.tree.flatten(pullback)
        given = jax.tree.leaves(inputs)
        stash = cls(tree, tuple(next((i for i, g in enumerate(given) if g is leaf), None)
                                for leaf in leaves))
        return stash, stash.kept(pullback)

    def kept(self, pullback: Any) -> list:
        """The residuals to stash of a pullback traced like the one recorded."""
        return [leaf for leaf, i in zip(jax.tree.leaves(pullback), self.source) if i is None]

    def leaves(self, kept: list, inputs: Any) -> list:
        """Every residual leaf again, from the stashed ones and the inputs."""
        given, kept = jax.tree.leaves(inputs), iter(kept)
        return [next(kept) if i is None else given[i] for i in self.source]

    def apply(self, *args: Any) -> Any:
        """(*residual leaves, output cotangent) -> the pullback's gradients."""
        return jax.tree.unflatten(self.tree, args[:-1])(args[-1])


@dataclasses.dataclass(frozen=True)
class Split:
    """`b(*args) -> (input gradients, handoff)` and `w(*args, *handoff) -> weight gradients`,
    flat lists; `args` are the traced function's flat arguments."""

    b: Callable[..., tuple[list, list]]
    w: Callable[..., list]
    handoff: tuple[jax.ShapeDtypeStruct, ...]


def split(fn: Callable[..., Any], args: Sequence[Any], weight_grads: int,
          cotangents: int = 1) -> Split:
    """Partition `fn(*args)`, whose first `weight_grads` flat outputs are weight gradients
    and the rest input gradients (see the module doc); its last `cotangents` flat arguments
    are the output cotangents, the others residuals. `args` may be tracers or
    ShapeDtypeStructs."""
    flat = jax.make_jaxpr(lambda *a: inlined(fn, a))(*args)
    jaxpr = flat.jaxpr
    grads_w, grads_in = jaxpr.outvars[:weight_grads], jaxpr.outvars[weight_grads:]
    b_eqns = _needed(jaxpr.eqns, grads_in)
    in_b = set(map(id, b_eqns))
    from_cotangent = set(jaxpr.invars[len(jaxpr.invars) - cotangents:])
    for eqn in jaxpr.eqns:
        if any(v in from_cotangent for v in eqn.invars if isinstance(v, core.Var)):
            from_cotangent.update(eqn.outvars)

    # walking back from the weight gradients: W runs what B does not, and recomputes B's
    # cheap work on the residuals alone; the rest of B's values it reads are the handoff
    live = {v for v in grads_w if isinstance(v, core.Var)}
    w_eqns, handoff = [], []
    for eqn in reversed(jaxpr.eqns):
        if not any(v in live for v in eqn.outvars):
            continue
        if id(eqn) in in_b and (eqn.outvars[0] in from_cotangent or _costly(eqn)):
            handoff += [v for v in eqn.outvars if v in live]
            continue
        w_eqns.append(eqn)
        live.update(v for v in eqn.invars if isinstance(v, core.Var))
    w_eqns.reverse()
    handoff = list(dict.fromkeys(handoff))

    def made(invars: list, outvars: list, eqns: list) -> core.Jaxpr:
        info = jaxpr.debug_info._replace(arg_names=("",) * len(invars),
                                         result_paths=("",) * len(outvars))
        effects = core.no_effects.union(*(e.effects for e in eqns))
        return core.Jaxpr(jaxpr.constvars, invars, outvars, eqns, effects, debug_info=info)

    b_jaxpr = made(jaxpr.invars, [*grads_in, *handoff], b_eqns)
    w_jaxpr = made([*jaxpr.invars, *handoff], grads_w, w_eqns)
    b_run = core.jaxpr_as_fun(core.ClosedJaxpr(b_jaxpr, flat.consts))
    w_run = core.jaxpr_as_fun(core.ClosedJaxpr(w_jaxpr, flat.consts))

    def b(*a: Any) -> tuple[list, list]:
        out = b_run(*a)
        return out[:len(grads_in)], out[len(grads_in):]

    return Split(b, w_run,
                 tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in handoff))


@dataclasses.dataclass(frozen=True)
class ChunkVjp:
    """A chunk's pullback as the tick loop stores it: `stash` says which residuals are the
    chunk's weights (rebuilt from them, not stashed); `kept` are the others as traced once
    before the loop (their shapes size the buffer; the microbatch's RNG keys are among them,
    so B and W recompute F's dropout masks); `halves` is the backward split into B and W
    (`jaxpar.emit.backward`) when the schedule splits it. `chunk(w, x)` returns the output
    and the variables after (not differentiated)."""

    stash: Stash
    kept: list
    halves: Split | None

    @classmethod
    def of(cls, chunk: Callable, w: Any, x: jax.Array, split_backward: bool) -> ChunkVjp:
        """Trace the pullback of `chunk` at (w, x), tracers of the tick loop's trace."""
        y, pullback, _ = jax.vjp(chunk, w, x, has_aux=True)
        stash, kept = Stash.of(pullback, w)
        halves = None
        if split_backward:
            halves = split(stash.apply, [*jax.tree.leaves(pullback), y],
                                    len(jax.tree.leaves(w)))
        return cls(stash, kept, halves)

    def keep(self, chunk: Callable, w: Any, x: jax.Array) -> tuple[jax.Array, list, dict]:
        """F: the chunk's output, its residuals to stash and its variables after."""
        y, pullback, variables = jax.vjp(chunk, w, x, has_aux=True)
        return y, self.stash.kept(pullback), variables
