"""The MPMD driver: the programs of `jaxpar.emit.mpmd` dispatched from Python in the
schedule's order, and the train state they update.

Each rank runs its ops in its schedule's order, an op as soon as its input is there, one op
per rank per sweep so that consecutive dispatches go to different stages (jax dispatches
asynchronously, so the stages overlap). The train state is a tuple of one `TrainState` per
chunk, each on its stage (an unrolled list's layers stacked, `Pieces.stored`); chunk 0 holds
the parameters outside the stack, copied to the last stage each step, their gradient from
`post` added back to chunk 0's. Variables (batch statistics, RNG streams) live likewise: a
chunk's layers' with the chunk, those outside the stack with chunk 0; the last chunk's `post`
starts from those chunk 0's F left (after `pre`), and what it leaves goes back to chunk 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh

from jaxpar.emit.mpmd import ChunkPrograms, StageMesh, add, check_chunks, chunk_programs
from jaxpar.emit.parallelized import Parallelized
from jaxpar.emit.shardings import make_mesh, state_sharding_of
from jaxpar.emit.state import TrainState, apply_gradients, updates_parts_alone
from jaxpar.emit.step import split_microbatches
from jaxpar.plan import Plan, PlanError
from jaxpar.planners.schedules.generators import Op, Schedule
from jaxpar.tracing.params import ModelFn
from jaxpar.tracing.stages import Pieces


def _nbytes(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


class StashRecord:
    """What each F left for its backward, by (microbatch, chunk); per rank the most sets and
    bytes (global, over the stage's devices) held at once."""

    def __init__(self, p: int):
        self.entries: dict[tuple[int, int], tuple[Any, list]] = {}
        self.sets, self.bytes = np.zeros(p, np.int64), np.zeros(p, np.int64)
        self.peak_sets, self.peak_bytes = np.zeros(p, np.int64), np.zeros(p, np.int64)

    def put(self, key: tuple[int, int], rank: int, entry: tuple[Any, list]) -> None:
        self.entries[key] = entry
        self.sets[rank] += 1
        self.bytes[rank] += _nbytes(entry)
        self.peak_sets[rank] = max(self.peak_sets[rank], self.sets[rank])
        self.peak_bytes[rank] = max(self.peak_bytes[rank], self.bytes[rank])

    def drop(self, key: tuple[int, int], rank: int) -> None:
        self.sets[rank] -= 1
        self.bytes[rank] -= _nbytes(self.entries.pop(key))


def walk(schedule: Schedule, chunks: Sequence[ChunkPrograms], stages: Sequence[StageMesh],
          params: Sequence[dict], variables: Sequence[dict], handed: Callable[[dict], dict],
          batches: dict[int, list]) -> tuple[Any, list, StashRecord, list]:
    """Run every rank's ops in its order, each as soon as its input is there, one op per
    rank per sweep so that consecutive dispatches go to different stages. Each F runs with
    its chunk's `variables`; the last chunk's also with `handed(v)` of the variables `v`
    chunk 0's F left. Returns the mean loss, each chunk's summed gradient, the stash's
    record and each chunk's variables after its (last) F."""
    last = schedule.num_chunks - 1
    inbox: dict[Op, Any] = {}  # an op's input: activation (F), output cotangent (B)
    stash = StashRecord(schedule.p)
    accs = [chunk.zeros() for chunk in chunks]
    updated = list(variables)
    losses = []

    def run(op: Op) -> None:
        c, mb, rank = op.chunk, op.microbatch, schedule.rank_of(op.chunk)
        chunk = chunks[c]
        batch = batches[rank][mb] if chunk.uses_batch else None
        if op.kind == "F":
            x = inbox.pop(op, None)
            own = {**handed(updated[0]), **variables[c]} if 0 < c == last else variables[c]
            y, kept, updated[c] = chunk.forward(params[c], own, batch, x, mb)
            stash.put((mb, c), rank, (x if chunk.residuals.needs_input else None, kept))
            if c == last:
                losses.append(y)
                inbox[Op("B", mb, c)] = None
            else:
                inbox[Op("F", mb, c + 1)] = jax.device_put(y, stages[c + 1].activations)
            return
        if op.kind == "W":
            inbox.pop(op)
            x, kept, dy, handoff = stash.entries[mb, c]
            accs[c] = chunk.weight_grad(params[c], batch, x, kept, dy, handoff, accs[c])
            stash.drop((mb, c), rank)
            return
        x, kept = stash.entries[mb, c]
        dy = inbox.pop(op)
        if schedule.splits_backward:
            dx, handoff = chunk.input_grad(params[c], batch, x, kept, dy)
            stash.drop((mb, c), rank)
            stash.put((mb, c), rank, (x, kept, dy, handoff))
            inbox[Op("W", mb, c)] = None
        else:
            dx, accs[c] = chunk.backward(params[c], batch, x, kept, dy, accs[c])
            stash.drop((mb, c), rank)
        if c > 0:
            inbox[Op("B", mb, c - 1)] = jax.device_put(dx, stages[c - 1].activations)

    def ready(op: Op) -> bool:
        return op in inbox or (op.kind == "F" and op.chunk == 0)

    queues = [deque(ops) for ops in schedule.ops]
    while any(queues):
        runnable = [q for q in queues if q and ready(q[0])]
        if not runnable:
            waiting = ", ".join(str(q[0]) for q in queues if q)
            raise RuntimeError(f"schedule {schedule.name} deadlocks: every rank waits ({waiting})")
        for queue in runnable:
            run(queue.popleft())
    return jnp.mean(jnp.stack(losses)), accs, stash, updated


class Driver:
    """The stages, the chunks' programs and the shardings of one pipelined plan; its methods
    are the fields of `Parallelized`. The train state is a tuple of one `TrainState` per chunk,
    each on its stage."""

    def __init__(self, model_fn: ModelFn, optimizer: optax.GradientTransformation,
                 plan: Plan, pieces: Pieces, chunk_layers: Sequence[int], schedule: Schedule,
                 devices: Sequence[jax.Device], rows: int):
        """`rows`: the batch's rows per microbatch."""
        self.model_fn, self.optimizer = model_fn, optimizer
        self.pieces, self.schedule = pieces, schedule
        self.mesh = make_mesh(plan, devices)
        inner = dataclasses.replace(plan, mesh=plan.mesh[1:], microbatches=1, pipeline=None)
        check_chunks(inner, chunk_layers)
        names = tuple(name for name, _ in inner.mesh)
        self.stages = [StageMesh(Mesh(self.mesh.devices[r], names,
                                   axis_types=(AxisType.Auto,) * len(names)), inner)
                       for r in range(plan.stages)]
        self.m, self.stack = plan.microbatches, pieces.stages.stack
        self.num_chunks = len(chunk_layers)
        self.last_rank = schedule.rank_of(self.num_chunks - 1)
        self.last_stage = self.stages[self.last_rank]
        self.chunk_stage = [self.stages[schedule.rank_of(c)] for c in range(self.num_chunks)]
        self.ranks = [tuple(range(r, self.num_chunks, plan.stages)) for r in range(plan.stages)]
        self.bounds = [int(b) for b in np.cumsum([0, *chunk_layers])]

        def per_chunk(tree: dict) -> list[dict]:
            return [jax.eval_shape(lambda x, c=c: self.chunk_params(x, c), tree)
                    for c in range(self.num_chunks)]

        shapes = per_chunk(pieces.stored_shape)
        variable_shapes = per_chunk(pieces.stored_variables_shape)
        shardings = [state_sharding_of(inner, self.chunk_stage[c].mesh, optimizer, shapes[c],
                                       variable_shapes[c]) for c in range(self.num_chunks)]
        self.state_shardings = [sharding for sharding, _ in shardings]
        self.abstract_state = tuple(abstract for _, abstract in shardings)
        self.outer_on_last = self.last_stage.param_shardings(pieces.outer(pieces.params_shape))
        outer_variables = pieces.outer(pieces.variables_shape)
        self.outer_variables_on_last = jax.tree.map(lambda _: self.last_stage.sharding(),
                                                    outer_variables)
        run_shapes = shapes[:-1] + [{**pieces.outer(pieces.params_shape), **shapes[-1]}]
        run_variables = variable_shapes[:-1] + [{**outer_variables, **variable_shapes[-1]}]
        self.chunks = [chunk_programs(pieces, c, self.num_chunks, self.m, self.chunk_stage[c],
                                      run_shapes[c], run_variables[c], rows)
                       for c in range(self.num_chunks)]
        self.inits = [jax.jit(functools.partial(self._init_rank, rank=r), out_shardings=tuple(
            self.state_shardings[c] for c in chunks)) for r, chunks in enumerate(self.ranks)]
        self.updates = [jax.jit(self._update, donate_argnums=0, out_shardings=(
            tuple(self.state_shardings[c] for c in chunks), stage.sharding()))
            for stage, chunks in zip(self.stages, self.ranks)]
        self.add = jax.jit(add)

    def chunk_params(self, params: dict, c: int) -> dict:
        """Chunk c's own stored parameters (or variables: `Pieces.stored`): its layers', and
        for chunk 0 everything outside them."""
        return self.pieces.part(params, self.bounds[c], self.bounds[c + 1])

    def join(self, chunk_dicts: Sequence[dict]) -> dict:
        """A model-structured dict on the host from per-chunk dicts."""
        layers = jax.tree.map(_on_host, *[self.pieces.stacked(d) for d in chunk_dicts])
        outer = jax.tree.map(_on_host, self.pieces.outer(chunk_dicts[0]))
        return self.pieces.restored(self.pieces.join(outer, layers))

    def shard_batch(self, batch: Any) -> dict[int, list]:
        """The microbatches, on the stages that read the batch (the first and the last)."""
        split = split_microbatches(batch, self.m)
        micro = [jax.tree.map(lambda x, j=j: x[j], split) for j in range(self.m)]
        return {r: jax.device_put(micro, self.stages[r].activations)
                for r in {0, self.last_rank}}

    def run(self, params: Sequence[dict], variables: Sequence[dict], batches: dict[int, list]
            ) -> tuple[Any, list, StashRecord, list]:
        """Loss, per-chunk gradients (chunk 0's hold all the outer ones), the stash and the
        per-chunk variables after the step (chunk 0's hold all the outer ones)."""
        outer, stacked, join = self.pieces.outer, self.pieces.stacked, self.pieces.join
        params = list(params)
        if self.num_chunks > 1:
            params[-1] = {**jax.device_put(outer(params[0]), self.outer_on_last), **params[-1]}
        loss, grads, stash, variables = walk(
            self.schedule, self.chunks, self.chunk_stage, params, variables,
            lambda v: jax.device_put(outer(v), self.outer_variables_on_last), batches)
        if self.num_chunks > 1:
            back = jax.device_put(outer(grads[-1]), outer(self.state_shardings[0].params))
            grads[0] = {**self.add(outer(grads[0]), back), self.stack: grads[0][self.stack]}
            grads[-1] = {self.stack: grads[-1][self.stack]}
            back = jax.device_put(outer(variables[-1]), outer(self.state_shardings[0].variables))
            variables[0] = join(back, stacked(variables[0]))
            variables[-1] = join({}, stacked(variables[-1]))
        return loss, grads, stash, variables

    def _init_rank(self, rng: jax.Array, rank: int) -> tuple[TrainState, ...]:
        """Build the whole model and keep this rank's chunks (XLA drops the rest)."""
        with nnx.use_eager_sharding(False):
            model = self.model_fn(nnx.Rngs(rng))
        params = self.pieces.stored(nnx.state(model, nnx.Param).to_pure_dict())
        variables = self.pieces.stored(nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict())
        states = []
        for c in self.ranks[rank]:
            own = self.chunk_params(params, c)
            states.append(TrainState(jnp.zeros((), jnp.int32), own, self.optimizer.init(own),
                                     self.chunk_params(variables, c)))
        return tuple(states)

    def init(self, rng: jax.Array) -> tuple[TrainState, ...]:
        states = [None] * self.num_chunks
        for init, stage, chunks in zip(self.inits, self.stages, self.ranks):
            for c, state in zip(chunks, init(jax.device_put(rng, stage.sharding()))):
                states[c] = state
        return tuple(states)

    def _update(self, states: tuple[TrainState, ...], grads: tuple[dict, ...],
                variables: tuple[dict, ...]):
        """Apply the optimizer to a rank's chunks and take their variables after the step;
        also the squared norm of their gradient."""
        new = []
        for state, g, v in zip(states, grads, variables):
            new.append(apply_gradients(self.optimizer, state, g, v))
        return tuple(new), sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(grads))

    def step(self, state: tuple[TrainState, ...], batches: dict[int, list]):
        loss, grads, stash, variables = self.run([s.params for s in state],
                                                 [s.variables for s in state], batches)
        new, norms = [None] * self.num_chunks, []
        for update, chunks in zip(self.updates, self.ranks):
            states, norm = update(tuple(state[c] for c in chunks), tuple(grads[c] for c in chunks),
                                  tuple(variables[c] for c in chunks))
            for c, s in zip(chunks, states):
                new[c] = s
            norms.append(jax.device_put(norm, self.last_stage.sharding()))
        metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(norms)),
                   "peak_stash": stash.peak_sets, "peak_stash_bytes": stash.peak_bytes}
        return tuple(new), metrics

    def params_of(self, state: tuple[TrainState, ...]) -> dict:
        return self.join([s.params for s in state])

    def variables_of(self, state: tuple[TrainState, ...]) -> dict:
        return self.join([s.variables for s in state])

    def loss_and_grads(self, params: dict, batch: Any, variables: dict | None = None
                       ) -> tuple[jax.Array, dict]:
        if variables is None and self.pieces.variables_shape:
            raise PlanError("the model has variables besides its parameters: pass "
                            "variables=par.variables_of(state)")
        params = self.pieces.stored(params)
        variables = self.pieces.stored(variables or {})
        placed = [jax.device_put(self.chunk_params(params, c), shardings.params)
                  for c, shardings in enumerate(self.state_shardings)]
        placed_variables = [jax.device_put(self.chunk_params(variables, c), shardings.variables)
                            for c, shardings in enumerate(self.state_shardings)]
        loss, grads, _, _ = self.run(placed, placed_variables, self.shard_batch(batch))
        return loss, self.join(grads)


def _on_host(*xs: jax.Array) -> Any:
    """An array, or several (one per chunk, each on its stage) concatenated, on the host;
    keys as a key array over their data."""
    def joined(arrays: list) -> np.ndarray:
        return np.concatenate(arrays) if len(arrays) > 1 else arrays[0]

    if jax.dtypes.issubdtype(xs[0].dtype, jax.dtypes.prng_key):
        data = joined([np.asarray(jax.random.key_data(x)) for x in xs])
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(xs[0]))
    return joined([np.asarray(x) for x in xs])


def updates_chunks_alone(optimizer: optax.GradientTransformation, pieces: Pieces) -> bool:
    """Whether updating each chunk's parameters on their own, as the MPMD form does, is the
    whole model's update: `updates_parts_alone` on small random parameters of the model's
    structure (every dimension cut to 2 but the stack's layers), parted mid-stack."""
    rng = np.random.default_rng(0)

    def small(tree: dict, keep_layers: bool) -> dict:
        return jax.tree.map(lambda s: rng.normal(size=tuple(
            d if keep_layers and i == 0 else min(d, 2) for i, d in enumerate(s.shape))
        ).astype(s.dtype), tree)

    shape, n = pieces.stored_shape, pieces.num_layers
    params = pieces.join(small(pieces.outer(shape), False), small(pieces.stacked(shape), True))
    return n < 2 or updates_parts_alone(optimizer, params, lambda tree: [
        pieces.part(tree, 0, n // 2), pieces.part(tree, n // 2, n)])


def parallelize_mpmd(model_fn: ModelFn, optimizer: optax.GradientTransformation, plan: Plan,
                     pieces: Pieces, chunk_layers: Sequence[int], schedule: Schedule,
                     batch: Any, devices: Sequence[jax.Device]) -> Parallelized:
    """The MPMD form of a checked pipelined plan (see `jaxpar.emit.pipeline`; the caller has
    checked `batch`, whose rows per microbatch the RNG streams draw). The train state is a
    tuple of one `TrainState` per chunk, each on its stage; `step`'s metrics add `peak_stash`
    and `peak_stash_bytes`: per rank, the most (microbatch, chunk) residual sets and bytes it
    held at once."""
    if not updates_chunks_alone(optimizer, pieces):
        raise PlanError("the optimizer's update couples parameters across pipeline chunks "
                        "(e.g. optax.clip_by_global_norm), but the MPMD form updates each "
                        "stage's chunks on their own; use form='spmd' or a plan without a "
                        "pipeline")
    rows = jax.tree.leaves(batch)[0].shape[0] // plan.microbatches
    rt = Driver(model_fn, optimizer, plan, pieces, chunk_layers, schedule, devices, rows)
    return Parallelized(plan=plan, mesh=rt.mesh, schedule=schedule,
                        state_sharding=tuple(rt.state_shardings),
                        abstract_state=rt.abstract_state, init=rt.init, step=rt.step,
                        shard_batch=rt.shard_batch, params_of=rt.params_of,
                        variables_of=rt.variables_of, loss_and_grads=rt.loss_and_grads)
