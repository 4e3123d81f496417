"""The MPMD pipeline runtime: a jitted program per chunk and pass, each on its stage's
submesh, dispatched from Python in the schedule's order.

Stage r owns the devices `mesh.devices[r]` of the plan's mesh. Inside a stage the plan
without its `stage` axis lays tensors out, GSPMD-automatic (`jaxpar.constrain` places the
activations: dp splits the batch over `data`, tp the heads and mlp over `tensor`).
Chunk c runs on stage c mod p with programs all from one `jax.vjp` of the chunk:

- F: forward (chunk 0 first runs `pre`, the last chunk ends with `post` and returns the
  microbatch loss), returning the output, the VJP residuals and the chunk's variables after
  it (`pre`'s and `post`'s for the variables outside the stack). Residuals that are F's own
  inputs (the weights, the batch) are not returned, since every jit output is a fresh
  buffer: B is handed those inputs again, so the stash holds activations only (and the
  microbatch's RNG keys, so that B and W recompute F's dropout masks).
- B: the input gradient, with the weight gradient added into the chunk's accumulator in
  the same pullback. The last chunk starts from d(mean loss)/d(loss) = 1/m.
- With a zero-bubble schedule, B and W instead: the two halves of that pullback.

Zero-bubble schedules split the backward (`jaxpar.emit.backward`): B computes the input gradient
and hands W the intermediate cotangents the weight gradient needs, so B and W together do
the fused backward's work (checked with XLA's cost analysis). The stash holds a chunk's
residuals until its W, with the handoff from its B to its W.

Parameters outside the stack (embedding, final norm, ...) live with chunk 0 on stage 0.
Each step copies them to the last chunk's stage; the gradient `post` gives them comes back
and is added to chunk 0's. The model's other variables (`jaxpar.emit.variables`) live the
same way, replicated inside their stage; each F starts from the step's, its RNG keys drawing
the microbatch's rows of the whole batch's bits (the whole microbatch is one program's, laid
out automatically, so its batch norms see it all).

Every chunk has its own optimizer state and update on its stage: elementwise optax
transforms (sgd, adam, adamw) equal the whole-model update, while one that reads a global
norm (clip_by_global_norm) would see each chunk's own norm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpar import context
from jaxpar.emit.backward import Split, Stash
from jaxpar.emit.backward import split as backward_split
from jaxpar.emit.shardings import by_path
from jaxpar.emit.variables import after_step, for_shard
from jaxpar.plan import Plan, PlanError
from jaxpar.tracing.stages import Pieces


def add(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.add, a, b)


@dataclasses.dataclass(frozen=True)
class StageMesh:
    """One pipeline stage: its submesh and the plan inside it."""

    mesh: Mesh
    plan: Plan

    def sharding(self, spec: PartitionSpec | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, spec or PartitionSpec())

    @property
    def activations(self) -> NamedSharding:
        """Activations and their gradients between chunks: split over the batch axes."""
        return self.sharding(PartitionSpec(self.plan.batch_axes or None))

    def param_shardings(self, shapes: dict) -> dict:
        """Shardings of a (part of the) model's parameter dict."""
        return by_path(shapes, self.plan.params, lambda info, _: self.sharding(
            context.partition_spec(self.plan.param_layout(info))))

    @contextlib.contextmanager
    def tracing(self) -> Iterator[None]:
        """Trace the model as this stage's plan lays it out."""
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            with context.active(self.plan, ()):
                yield


@dataclasses.dataclass
class Residuals:
    """How B rebuilds F's pullback (`stash`, over F's inputs (params, batch, x): the chunk
    input x is stashed only when a residual is x itself), recorded while F traces; B and W
    trace after F, for the same shapes."""

    stash: Stash | None = None
    known: int = 0  # leaves of (params, batch): the driver has them without a stash
    halves: Split | None = None  # the backward as B and W, traced with B
    output: jax.ShapeDtypeStruct | None = None

    def record(self, pullback: Any, inputs: tuple) -> list:
        self.stash, kept = Stash.of(pullback, inputs)
        self.known = len(jax.tree.leaves(inputs[:2]))
        return kept

    @property
    def needs_input(self) -> bool:
        return any(i is not None and i >= self.known for i in self.stash.source)


@dataclasses.dataclass(frozen=True)
class ChunkPrograms:
    """The jitted programs of one chunk on its stage (see the module docstring)."""

    residuals: Residuals
    forward: Callable  # (params, variables, batch, x, microbatch) -> (y, kept, variables)
    backward: Callable  # (params, batch, x, kept, dy, acc) -> (dx, acc)
    input_grad: Callable  # (params, batch, x, kept, dy) -> (dx, handoff): B of a split
    weight_grad: Callable  # (params, batch, x, kept, dy, handoff, acc) -> acc: W
    zeros: Callable  # () -> a zero gradient accumulator
    uses_batch: bool


def chunk_programs(pieces: Pieces, chunk: int, num_chunks: int, m: int, stage: StageMesh,
                   param_shapes: dict, variable_shapes: dict, rows: int) -> ChunkPrograms:
    """Programs of `chunk`, called with parameters of `param_shapes`, variables of
    `variable_shapes` (the last chunk's hold those outside the stack as chunk 0's F left
    them) and microbatches of `rows` rows."""
    first, last = chunk == 0, chunk == num_chunks - 1
    residuals = Residuals()

    def run(params: dict, variables: dict, x: Any, batch: Any, microbatch: Any) -> Any:
        """The chunk's output and its variables after; the keys draw the microbatch's rows
        of the whole batch's random bits (rows microbatch, microbatch + m, ...)."""
        def seen(tree: dict) -> dict:
            return for_shard(tree, microbatch, m, rows)

        outer = pieces.outer(variables)
        if first:
            x, after = pieces.pre(pieces.outer(params), seen(outer), batch)
            outer = after_step(after, outer, ())
        y, stack = pieces.chunk(pieces.stacked(params), seen(pieces.stacked(variables)), x)
        if last:
            y, after = pieces.post(pieces.outer(params), seen(outer), y, batch)
            outer = after_step(after, outer, ())
        return y, after_step(pieces.join(outer, stack), variables, ())

    def forward(params, variables, batch, x, microbatch):
        with stage.tracing():
            y, pullback, after = jax.vjp(
                lambda p, h: run(p, variables, h, batch, microbatch), params, x, has_aux=True)
        residuals.output = jax.ShapeDtypeStruct(y.shape, y.dtype)
        return y, residuals.record(pullback, (params, batch, x)), after

    def output_grad(dy):
        if dy is None:  # the loss: each microbatch's is 1/m of the step's
            dy = jnp.full(residuals.output.shape, 1 / m, residuals.output.dtype)
        return dy

    def backward(params, batch, x, kept, dy, acc):
        with stage.tracing():
            d_params, dx = residuals.stash.apply(
                *residuals.stash.leaves(kept, (params, batch, x)), output_grad(dy))
        return dx, add(acc, d_params)

    def split_args(params, batch, x, kept, dy):
        args = [*residuals.stash.leaves(kept, (params, batch, x)), output_grad(dy)]
        if residuals.halves is None:
            with stage.tracing():
                residuals.halves = backward_split(residuals.stash.apply, args,
                                                  len(jax.tree.leaves(params)))
        return args

    def input_grad(params, batch, x, kept, dy):
        args = split_args(params, batch, x, kept, dy)
        with stage.tracing():
            dx, handoff = residuals.halves.b(*args)
        return (dx[0] if dx else None), handoff

    def weight_grad(params, batch, x, kept, dy, handoff, acc):
        args = split_args(params, batch, x, kept, dy)
        with stage.tracing():
            d_params = residuals.halves.w(*args, *handoff)
        return add(acc, jax.tree.unflatten(jax.tree.structure(params), d_params))

    param_shardings = stage.param_shardings(param_shapes)
    dx_sharding = None if first else stage.activations
    out_sharding = stage.sharding() if last else stage.activations
    variable_shardings = jax.tree.map(lambda _: stage.sharding(), variable_shapes)
    return ChunkPrograms(
        residuals=residuals,
        forward=jax.jit(forward, out_shardings=(out_sharding, None, variable_shardings)),
        backward=jax.jit(backward, out_shardings=(dx_sharding, param_shardings),
                         donate_argnums=5),
        input_grad=jax.jit(input_grad, out_shardings=(dx_sharding, None)),
        weight_grad=jax.jit(weight_grad, out_shardings=param_shardings, donate_argnums=6),
        zeros=jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), param_shapes),
                      out_shardings=param_shardings),
        uses_batch=first or last,
    )


def check_chunks(plan: Plan, chunk_layers: Sequence[int]) -> None:
    """A stack split over a mesh axis inside the stage must split every chunk evenly."""
    for info in plan.params:
        if "layers" not in info.logical_axes:
            continue
        axes = plan.param_layout(info)[info.logical_axes.index("layers")]
        size = math.prod(plan.mesh_shape[a] for a in axes)
        if any(n % size for n in chunk_layers):
            raise PlanError(f"{info.path}: the layers axis is split over {'x'.join(axes)} "
                            f"(size {size}) inside each stage, which does not divide the "
                            f"chunks of {list(chunk_layers)} layers; map `layers` to () or "
                            f"cut chunks of multiples of {size} layers")
