"""The SPMD form of the pipeline runtime: one jitted program over the whole mesh.

The program is a `shard_map` manual over `stage` and the batch axes (`data`, `fsdp`) and
automatic over `tensor`, as in `jaxpar.emit.step`. The layer stack (an unrolled list's
entries stacked, `Pieces.stored`) is stored as (v, p, k, ...) with p split over `stage`,
so rank r holds local chunk j = chunk j p + r (Megatron's interleaved layout; v = 1 is
plain 1F1B). A `lax.scan` walks the tick table of `planners.schedules.ticks`: in each
tick every rank runs the op of its row (`lax.switch` on the row picked by its stage index),
then activations move one rank forward and gradients one rank back (cyclic `ppermute`s)
into the buffer slots the table names.

F stashes the chunk's VJP residuals (those that are not its weights) and B applies the
pullback to them; with a zero-bubble schedule B and W are the two halves of that pullback
(`jaxpar.emit.backward`), B stashing the handoff for W. Each tick copies a residual set in and
out of the buffer (XLA copies a buffer a conditional writes, so the writes happen outside
the `lax.switch`), so residuals are kept small: the plan's remat policy is "dots" (the
chunk saves matmul outputs only, `jax.checkpoint_policies.dots_saveable`, and B recomputes
the elementwise work between them) or "full" (each layer is rematerialised as in every
other program); `Plan.check` refuses "none". Every chunk has the same residual
structure, traced once before the loop. Chunk 0's F embeds its microbatch (`pieces.pre`)
and its B re-embeds it for the embedding's gradient; the last chunk's F also runs the head
and loss (`pieces.post`) and
stashes the loss gradient for its backward. Parameters outside the stack are replicated
over `stage`; their gradient (pre's part on rank 0, post's on rank p - 1) is summed over
`stage` once per step.

The model's other variables (`jaxpar.emit.variables`) are laid out like the parameters
beside them: the stack's as (v, p, k, ...) split over `stage`, the others replicated. Every
F starts from the step's variables, its RNG keys drawing the microbatch's rows of the whole
batch's bits; the keys are among the residuals F stashes, so B and W recompute its masks.
The last chunk's `post` starts from the variables `pre` leaves, computed once before the
loop (on the first microbatch: RNG counts are the same for each; batch statistics come
with microbatches=1 only). The loop carries each chunk's variables after its F and those
after `post`; at the end each stage's batch shards agree on them (batch norms average over
the batch axes) and those outside the stack are the last chunk's rank's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpar import context
from jaxpar.emit.backward import ChunkVjp
from jaxpar.emit.parallelized import Parallelized
from jaxpar.emit.shardings import abstract_state, by_path, make_mesh
from jaxpar.emit.state import TrainState, apply_gradients, init_state
from jaxpar.emit.step import require_layer, split_microbatches
from jaxpar.emit.variables import after_step, for_shard, held_by
from jaxpar.plan import Layout, ParamInfo, Plan, PlanError
from jaxpar.planners.schedules.generators import Schedule
from jaxpar.planners.schedules.ticks import TickTable, tick_table
from jaxpar.tracing.params import ModelFn
from jaxpar.tracing.stages import Pieces

IDLE, FORWARD, BACKWARD, WEIGHT = range(4)
_KIND = {None: IDLE, "F": FORWARD, "B": BACKWARD, "W": WEIGHT}


def _rows(table: TickTable) -> np.ndarray:
    """The tick table as int32 (ticks, p, 9): op kind, microbatch, local chunk, the x, r, g,
    h slots, and the slots receiving this tick's activation and gradient (-1: none)."""
    s = table.schedule
    return np.array([[(_KIND[c.op.kind if c.op else None], c.op.microbatch if c.op else 0,
                       c.op.chunk // s.p if c.op else 0, c.x, c.r, c.g, c.h, c.recv_x,
                       c.recv_g) for c in row] for row in table.cells], np.int32)


def _chunked(pieces: Pieces, params: dict, p: int, v: int) -> dict:
    """The model's parameters (or variables) as this form stores them: the stack's (L, ...)
    leaves (an unrolled list's, stacked: `Pieces.stored`) as (v, p, k, ...), [j, r] being
    chunk j p + r."""
    params = pieces.stored(params)
    stack = jax.tree.map(lambda x: x.reshape(v, p, -1, *x.shape[1:]), pieces.stacked(params))
    return pieces.join(pieces.outer(params), stack)


def _unchunked(pieces: Pieces, params: dict) -> dict:
    """Parameters (gradients, variables) stored by `_chunked` in the model's own
    structure."""
    stack = jax.tree.map(lambda x: x.reshape(-1, *x.shape[3:]), pieces.stacked(params))
    return pieces.restored(pieces.join(pieces.outer(params), stack))


def _add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


def _get(buffer: Any, slot: jax.Array) -> Any:
    """Slot `slot` of each array of a buffer (the spare last slot when -1)."""
    return jax.tree.map(lambda b: b[slot], buffer)


def _put(buffer: Any, slot: jax.Array, value: Any) -> Any:
    """`value` into slot `slot` of a buffer's arrays, in place; into the spare last slot
    (where nothing is read from) when -1."""
    return jax.tree.map(lambda b, v: b.at[jnp.where(slot >= 0, slot, b.shape[0] - 1)].set(v),
                        buffer, value)


def _pipelined(plan: Plan, pieces: Pieces, mesh: Mesh, table: TickTable,
               layout: Callable[[ParamInfo], Layout], chunked_shape: dict,
               variable_specs: dict) -> Callable[[dict, dict, Any], tuple[jax.Array, dict, dict]]:
    """(chunked params, chunked variables, batch) -> (mean loss, variables after, mean
    gradient): the tick loop on every rank."""
    batch_axes = plan.batch_axes
    manual = ("stage",) + batch_axes
    p, m = plan.stages, plan.microbatches
    num_chunks = table.schedule.num_chunks
    split_backward = table.schedule.splits_backward
    rows = _rows(table)
    forward_perm = [(r, (r + 1) % p) for r in range(p)]
    backward_perm = [(r, (r - 1) % p) for r in range(p)]

    def replicated_over(info: ParamInfo) -> tuple[str, ...]:
        return tuple(a for a in manual if a not in sum(layout(info), ()))

    def vary(tree: Any) -> Any:
        """Mark values varying over every manual axis, like everything the loop carries."""
        def one(a):
            varying = jax.typeof(a).manual_axis_type.varying
            missing = tuple(ax for ax in manual if ax not in varying)
            return lax.pcast(a, missing, to="varying") if missing else a
        return jax.tree.map(one, tree)

    def zeros(tree: Any, slots: int | None = None) -> Any:
        """Zeros like `tree` (leading `slots` dimension when given), varying everywhere."""
        lead = () if slots is None else (slots,)
        return vary(jax.tree.map(lambda a: jnp.zeros((*lead, *a.shape), a.dtype), tree))

    def gathered(outer: dict) -> dict:
        return by_path(outer, plan.params,
                        lambda i, x: context.gather(x, plan.param_layout(i)))

    def pre(outer: dict, variables: dict, batch: Any) -> tuple[jax.Array, dict]:
        return pieces.pre(gathered(outer), variables, batch)

    def post(outer: dict, variables: dict, x: jax.Array, batch: Any) -> tuple[jax.Array, dict]:
        return pieces.post(gathered(outer), variables, x, batch)

    def local(params: dict, variables: dict, batch: Any) -> tuple[jax.Array, dict, dict]:
        # a checkpoint of its own per trace: jax.checkpoint caches its trace by function, and
        # a cached trace would not call `jaxpar.layer` (`require_layer`)
        chunk_fn = pieces.chunk if plan.remat == "full" else jax.checkpoint(
            lambda *args: pieces.chunk(*args), policy=jax.checkpoint_policies.dots_saveable)
        # marked varying so that gradients stay per device until the one psum at the end
        params = by_path(params, plan.params, lambda i, x: lax.pcast(
            x, replicated_over(i), to="varying") if replicated_over(i) else x)
        outer = pieces.outer(params)
        stack = jax.tree.map(lambda w: w[:, 0], pieces.stacked(params))  # (v, k, ...)
        outer_vars = pieces.outer(variables)
        stack_vars = jax.tree.map(lambda a: a[:, 0], pieces.stacked(variables))  # (v, k, ...)
        micro = split_microbatches(batch, m)
        rank = lax.axis_index("stage")
        shard_rows = jax.tree.leaves(batch)[0].shape[0]
        shard = lax.axis_index(batch_axes) if batch_axes else 0

        def seen(tree: dict, microbatch: Any) -> dict:
            """Variables as microbatch `microbatch` of this batch shard sees them: its keys
            draw its rows of the whole batch's random bits (as in the flat step); varying
            over every manual axis, like everything the loop carries, so that the traced
            pullback and the tick loop see the same types."""
            return vary(for_shard(tree, shard * shard_rows + microbatch, m, shard_rows // m))

        one_microbatch = jax.tree.map(lambda a: a[0], micro)
        # post starts from the variables outside the stack as pre leaves them, which are
        # the same for every microbatch (RNG counts; statistics only with m = 1)
        pre_vars = after_step(pre(outer, seen(outer_vars, 0), one_microbatch)[1], outer_vars,
                              batch_axes) if outer_vars else {}
        activation = zeros(jax.eval_shape(lambda o, b: pre(o, seen(outer_vars, 0), b)[0],
                                          outer, one_microbatch))
        first_vars = seen(jax.tree.map(lambda a: a[0], stack_vars), 0)
        vjp = ChunkVjp.of(lambda w, x: chunk_fn(w, first_vars, x),
                           jax.tree.map(lambda a: a[0], stack), activation, split_backward)
        handoff_shapes = list(vjp.halves.handoff) if vjp.halves else []
        loss_shape = jax.eval_shape(lambda o, y, b: post(o, seen(pre_vars, 0), y, b)[0],
                                    outer, activation, one_microbatch)

        def run_op(kind, microbatch, j, x, r, g, h, buffers, acc, updated):
            """This rank's op on local chunk j, reading its input activation, residuals,
            output gradient and handoff from slots x, r, g, h of `buffers`: the activation
            and gradient it sends, the residuals, loss gradient and handoff it stashes
            (zeros where none), the accumulators (chunk grads, outer grads, loss sum) and
            the variables after it (`updated`: the stack's, (v, k, ...), and those outside
            it) updated. Each F starts from the step's variables; the last chunk's post from
            pre's. The `lax.switch` only reads the buffers: XLA copies a buffer that a
            conditional writes."""
            chunk = j * p + rank
            first, last = chunk == 0, chunk == num_chunks - 1
            w = jax.tree.map(lambda a: a[j], stack)
            own = jax.tree.map(lambda a: a[j], stack_vars)
            stack_now, outer_now = updated
            unchanged = (jax.tree.map(lambda a: a[j], stack_now), outer_now)
            mb = jax.tree.map(lambda a: a[microbatch], micro)
            nothing = zeros(activation)
            no_dw = zeros(w)
            xs, rs, gs, hs = buffers
            no_kept, no_handoff = zeros(vjp.kept), zeros(handoff_shapes)
            no_loss = zeros(loss_shape)

            def embedded() -> jax.Array:
                return pre(outer, seen(outer_vars, microbatch), mb)[0]

            def forward():
                x_in = lax.cond(first, lambda: vary(embedded()), lambda: xs[x])
                y, stashed, own_after = vjp.keep(
                    lambda w, x: chunk_fn(w, seen(own, microbatch), x), w, x_in)

                def head():  # the last chunk's output gradient comes from the loss
                    value, post_vjp, after = jax.vjp(
                        lambda o, y: post(o, seen(pre_vars, microbatch), y, mb), outer, y,
                        has_aux=True)
                    d_o, gy = post_vjp(jnp.ones_like(value))
                    return vary((gy, d_o, value, after_step(after, pre_vars, batch_axes)))

                gy, d_o, value, outer_after = lax.cond(
                    last, head, lambda: (*zeros((y, outer, loss_shape)), outer_now))
                return ((vary(y), nothing, vary(stashed), gy, no_handoff), (no_dw, d_o, value),
                        (vary(after_step(own_after, own, batch_axes)), outer_after))

            def backward():
                leaves = vjp.stash.leaves(_get(rs, r), w)
                if vjp.halves:
                    (dx,), handoff_out = vjp.halves.b(*leaves, gs[g])
                    dw = no_dw
                else:
                    dw, dx = vjp.stash.apply(*leaves, gs[g])
                    handoff_out = no_handoff

                def embedding():  # chunk 0's input gradient goes on into the embedding
                    _, pre_vjp = jax.vjp(lambda o: pre(o, seen(outer_vars, microbatch), mb)[0],
                                         outer)
                    return vary(pre_vjp(dx)[0])

                d_o = lax.cond(first, embedding, lambda: zeros(outer))
                return ((nothing, vary(dx), no_kept, nothing, vary(handoff_out)),
                        (vary(dw), d_o, no_loss), unchanged)

            def weight():
                dw = vjp.halves.w(*vjp.stash.leaves(_get(rs, r), w), gs[g], *_get(hs, h))
                dw = jax.tree.unflatten(jax.tree.structure(w), dw)
                return ((nothing, nothing, no_kept, nothing, no_handoff),
                        (vary(dw), zeros(outer), no_loss), unchanged)

            def idle():
                return ((nothing, nothing, no_kept, nothing, no_handoff),
                        (no_dw, zeros(outer), no_loss), unchanged)

            branches = [idle, forward, backward] + ([weight] if vjp.halves else [])
            moved, (dw, d_o, value), (own_after, outer_after) = lax.switch(kind, branches)
            d_stack, d_outer, loss = acc
            d_stack = jax.tree.map(lambda a, d: a.at[j].add(d), d_stack, dw)
            stack_now = jax.tree.map(lambda a, u: a.at[j].set(u), stack_now, own_after)
            return moved, (d_stack, _add(d_outer, d_o), loss + value), (stack_now, outer_after)

        def tick(carry, rows_now):
            xs, rs, gs, hs, acc, updated = carry
            kind, microbatch, j, x, r, g, h, x_recv, g_recv = rows_now[rank]
            (y, dx, kept, gy, handoff_out), acc, updated = run_op(
                kind, microbatch, j, x, r, g, h, (xs, rs, gs, hs), acc, updated)
            # what the op stashes goes to its slot, anything else to the spare last slot
            rs = _put(rs, jnp.where(kind == FORWARD, r, -1), kept)
            gs = _put(gs, jnp.where(kind == FORWARD, g, -1), gy)
            hs = _put(hs, jnp.where(kind == BACKWARD, h, -1), handoff_out)
            xs = _put(xs, x_recv, lax.ppermute(y, "stage", forward_perm))
            gs = _put(gs, g_recv, lax.ppermute(dx, "stage", backward_perm))
            return (xs, rs, gs, hs, acc, updated), None

        # every buffer has a spare last slot, where writes for nobody land
        slots = {kind: n + 1 for kind, n in table.slots.items()}
        loss = jnp.zeros((), activation.dtype)
        carry = (zeros(activation, slots["x"]), zeros(vjp.kept, slots["r"]),
                 zeros(activation, slots["g"]), zeros(handoff_shapes, slots["h"]),
                 zeros((stack, outer, loss_shape)), vary((stack_vars, outer_vars)))
        (*_, (d_stack, d_outer, loss), (stack_after, outer_after)), _ = lax.scan(
            tick, carry, rows)
        grads = pieces.join(d_outer, jax.tree.map(lambda g: g[:, None], d_stack))
        grads = by_path(grads, plan.params, lambda i, g: lax.psum(g, replicated_over(i))
                         if replicated_over(i) else g)
        loss = lax.psum(loss, "stage") / m
        if batch_axes:
            loss = lax.pmean(loss, batch_axes)
        # the stack's variables as each stage's batch shards agree on them; those outside
        # the stack as the last chunk's rank left them
        stack_after = held_by(stack_after, stack_vars, batch_axes, 0)
        outer_after = held_by(held_by(outer_after, outer_vars, "stage", (num_chunks - 1) % p),
                              outer_vars, batch_axes, 0)
        variables = pieces.join(outer_after, jax.tree.map(lambda a: a[:, None], stack_after))
        scale = 1 / (m * plan.data_parallel_size)
        return loss, variables, jax.tree.map(lambda g: g * scale, grads)

    specs = by_path(chunked_shape, plan.params, lambda i, _: context.partition_spec(
        layout(i), keep=lambda a: a in manual))
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(specs, variable_specs, PartitionSpec(batch_axes or None)),
        out_specs=(PartitionSpec(), variable_specs, specs), axis_names=set(manual))


def parallelize_spmd(model_fn: ModelFn, optimizer: optax.GradientTransformation, plan: Plan,
                     pieces: Pieces, chunk_layers: Sequence[int], schedule: Schedule,
                     batch: Any, devices: Sequence[jax.Device]) -> Parallelized:
    """The plan's pipelined train step as one SPMD program (see the module doc)."""
    p, v = plan.stages, plan.pipeline.virtual
    mesh = make_mesh(plan, devices)
    stack = pieces.stages.stack + "/"
    pieces = dataclasses.replace(pieces, batch_axes=plan.batch_axes)

    def layout(info: ParamInfo) -> Layout:
        """A parameter's layout as stored: the stack's gains (v, p) dims, p over `stage`."""
        base = plan.param_layout(info)
        return ((), ("stage",)) + base if info.path.startswith(stack) else base

    chunked_shape = jax.eval_shape(lambda x: _chunked(pieces, x, p, v), pieces.params_shape)
    chunked_variables = jax.eval_shape(lambda x: _chunked(pieces, x, p, v),
                                       pieces.variables_shape)

    def variables_placed(place: Callable[[PartitionSpec], Any]) -> dict:
        """`place(spec)` for each variable: the stack's split over `stage` like its
        parameters, the others replicated."""
        return pieces.join(
            jax.tree.map(lambda _: place(PartitionSpec()), pieces.outer(chunked_variables)),
            jax.tree.map(lambda _: place(PartitionSpec(None, "stage")),
                         pieces.stacked(chunked_variables)))

    replicated = NamedSharding(mesh, PartitionSpec())
    param_sharding = by_path(chunked_shape, plan.params, lambda i, _: NamedSharding(
        mesh, context.partition_spec(layout(i))))
    opt_shape = jax.eval_shape(optimizer.init, chunked_shape)
    opt_sharding = optax.tree_map_params(optimizer, lambda _, s: s, opt_shape, param_sharding,
                                         transform_non_params=lambda _: replicated)
    state_sharding = TrainState(replicated, param_sharding, opt_sharding,
                                variables_placed(lambda spec: NamedSharding(mesh, spec)))
    batch_sharding = jax.tree.map(
        lambda _: NamedSharding(mesh, PartitionSpec(plan.batch_axes or None)), batch)
    pipelined = _pipelined(plan, pieces, mesh, tick_table(schedule), layout, chunked_shape,
                           variables_placed(lambda spec: spec))

    def run(params: dict, variables: dict, batch: Any) -> tuple[jax.Array, dict, dict]:
        """On chunked parameters and variables, with the plan active for `constrain` and
        `layer`."""
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            with context.active(plan, ("stage",) + plan.batch_axes) as active:
                result = pipelined(params, variables, batch)
        require_layer(plan, active)
        return result

    def init(rng: jax.Array) -> TrainState:
        state = init_state(model_fn, optimizer, rng, lambda x: _chunked(pieces, x, p, v))
        return state._replace(variables=_chunked(pieces, state.variables, p, v))

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, variables, grads = run(state.params, state.variables, batch)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return apply_gradients(optimizer, state, grads, variables), metrics

    def loss_and_grads(params: dict, batch: Any, variables: dict | None = None
                       ) -> tuple[jax.Array, dict]:
        if variables is None and pieces.variables_shape:
            raise PlanError("the model has variables besides its parameters: pass "
                            "variables=par.variables_of(state)")
        loss, _, grads = run(_chunked(pieces, params, p, v),
                             _chunked(pieces, variables or {}, p, v), batch)
        return loss, _unchunked(pieces, grads)

    return Parallelized(
        plan=plan,
        mesh=mesh,
        schedule=schedule,
        state_sharding=state_sharding,
        abstract_state=abstract_state(chunked_shape, opt_shape, state_sharding,
                                      chunked_variables),
        init=jax.jit(init, out_shardings=state_sharding),
        step=jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, replicated), donate_argnums=0),
        shard_batch=lambda batch: jax.device_put(batch, batch_sharding),
        params_of=lambda state: _unchunked(pieces, state.params),
        variables_of=lambda state: _unchunked(pieces, state.variables),
        loss_and_grads=jax.jit(loss_and_grads),
    )
