"""The model's variables other than its parameters, in a step that splits the batch.

A forward pass may update variables (`nnx.BatchStat` running statistics, the counts of its
RNG streams). Run on one batch shard, it must update them as the single-device step does on
the whole batch:

- batch norms compute their statistics over the whole batch: each `nnx.BatchNorm` without
  an `axis_name` of its own gets the plan's batch axes (its mean and variance are averaged
  over them);
- dropout draws each shard's rows of the whole batch's mask: every threefry key the model
  holds becomes a `jaxpar.shard_rng` key of the shard's rows (so masks depend neither on the
  data-parallel degree nor on the microbatch count);
- any other floating-point variable that differs between shards is averaged over them
  (the mean over the data-parallel group), and keys come back as they went in.

Every microbatch starts from the step's variables; a variable updated from batch statistics
would see only its microbatch, so such models run with microbatches=1 (`check`; under a
pipeline `check_pipeline`). The SPMD pipeline carries the variables through its tick loop
typed as varying over its manual axes and settles them at the end (`held_by`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.plan import Plan, PlanError
from jaxpar.shard_rng import is_threefry_key, shard_key
from jaxpar.tracing.params import path_str, statistics


def check(plan: Plan, variables: nnx.State, batch_size: int | None = None) -> None:
    """The plan can update these variables as one device would, or a PlanError says why.
    `batch_size`: the global batch's, for the rows each shard's microbatch draws."""
    stats = statistics(variables)
    if stats and plan.microbatches > 1:
        raise PlanError(f"the model's {', '.join(stats)} may be updated by the forward pass "
                        f"(variables other than RNG streams), which would see one microbatch "
                        f"at a time (microbatches={plan.microbatches}); use microbatches=1")
    keys = [(path_str(p), v.get_value()) for p, v in nnx.to_flat_state(variables)
            if _is_key(v.get_value())]
    rows = batch_size and batch_size // (plan.data_parallel_size * plan.microbatches)
    if keys and rows == 1:
        raise PlanError(f"each batch shard's microbatch holds 1 example ({batch_size} over "
                        f"{plan.data_parallel_size} shards x {plan.microbatches} microbatches)"
                        f"; the model's RNG streams ({keys[0][0]}) would not tell a draw over "
                        "its examples from one broadcast over them: give each at least 2")
    for path, key in keys:
        if not is_threefry_key(key):
            raise PlanError(f"the model's RNG key {path} is not a threefry key; jaxpar splits "
                            "threefry keys over batch shards; create the Rngs from "
                            "jax.random.key(seed)")
    if keys and not jax.config.jax_threefry_partitionable:
        raise PlanError("jax_threefry_partitionable is off: with it off, a batch shard cannot "
                        "draw its rows of the whole batch's random bits; turn it back on")


def check_pipeline(plan: Plan, variables: nnx.State, batch_size: int | None = None) -> None:
    """`check` for a pipelined plan, whose fix for batch statistics names the schedules that
    accept microbatches=1."""
    stats = statistics(variables)
    if stats and plan.microbatches > 1:
        raise PlanError(f"the model's {', '.join(stats)} are updated by the forward pass, which "
                        f"would see one microbatch at a time (microbatches="
                        f"{plan.microbatches}); a pipeline runs such a model with "
                        "microbatches=1, which the gpipe and 1f1b schedules accept (the one "
                        "microbatch passes the stages in turn), or use a plan without a "
                        "pipeline")
    check(plan, variables, batch_size)


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def for_shard(variables: dict, first_row: jax.Array, stride: int, rows: int) -> dict:
    """The variables one shard's forward pass sees: its threefry keys draw the rows
    first_row, first_row + stride, ... (`rows` of them) of the whole batch."""
    return jax.tree.map(lambda x: shard_key(x, first_row, stride, rows) if _is_key(x) else x,
                        variables)


def sync_batch_norms(model: nnx.Module, batch_axes: Sequence[str]) -> None:
    """Batch norms without an axis name of their own average their statistics over
    `batch_axes`."""
    if not batch_axes:
        return
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm) and module.axis_name is None:
            module.axis_name = tuple(batch_axes)


def after_step(new: dict, old: dict, manual: Sequence[str]) -> dict:
    """The variables a step returns: keys as they were (a forward pass only counts its RNG
    draws), floating-point values that differ over the `manual` axes averaged over them."""
    def one(n, o):
        if _is_key(o):
            return o
        varying = tuple(a for a in manual if a in jax.typeof(n).manual_axis_type.varying)
        if varying and jnp.issubdtype(n.dtype, jnp.floating):
            return jax.lax.pmean(n, varying)
        return n

    return jax.tree.map(one, new, old)


def held_by(new: dict, old: dict, axes: str | Sequence[str], index: int | jax.Array) -> dict:
    """Each variable as the device at `index` along the manual `axes` holds it, on all of them
    (invariant over `axes`); keys as in `old`. A pipeline's tick loop carries the variables
    typed varying over every manual axis: those a stage computed alike on each batch shard,
    or on one stage only, become the step's."""
    def one(n, o):
        if _is_key(o):
            return o
        if not axes:
            return n
        mine = jax.lax.axis_index(axes) == index  # a masked sum: exact, and invariant
        return jax.lax.psum(jnp.where(mine, n, jnp.zeros_like(n)), axes)

    return jax.tree.map(one, new, old)


def of_model(model: nnx.Module, like: dict) -> dict:
    """The model's variables with the paths of `like` (the step's): a variable the forward
    pass created (`sow`'s intermediates) is not state; return it from the loss as aux."""
    def keep(new: dict, old: dict) -> dict:
        return {k: keep(new[k], v) if isinstance(v, dict) else new[k] for k, v in old.items()}

    return keep(nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict(), like)
