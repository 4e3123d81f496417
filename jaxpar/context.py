"""What a model sees of the active plan while jaxpar traces it.

The train step runs the model inside a `shard_map` that is manual over the batch mesh axes
(`data`, `fsdp`) and automatic over the rest (`tensor`). Models name their activations'
axes with `constrain` and mark their repeated layer with `layer`; there jaxpar gathers the
layer's `fsdp` shards (whose transpose is the gradient reduce-scatter) and applies remat.
Outside a jaxpar trace both do nothing, so the same model runs anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from jaxpar.plan import Layout, Plan, PlanError

GATHERED = "jaxpar_gathered"


@dataclasses.dataclass
class Active:
    plan: Plan
    manual: tuple[str, ...]
    layer_called: bool = False


_ACTIVE: contextvars.ContextVar[Active | None] = contextvars.ContextVar("jaxpar", default=None)


def partition_spec(layout: Layout, keep: Callable[[str], bool] = lambda _: True) -> PartitionSpec:
    """PartitionSpec of a layout, keeping only the mesh axes `keep` accepts."""
    entries = [tuple(a for a in axes if keep(a)) for axes in layout]
    return PartitionSpec(*(e if e else None for e in entries))


@contextlib.contextmanager
def active(plan: Plan, manual: Sequence[str]) -> Iterator[Active]:
    """Make `plan` the one `constrain` and `layer` follow, with `manual` mesh axes manual."""
    token = _ACTIVE.set(Active(plan, tuple(manual)))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Lay `x` out as the active plan's rules map `logical_axes` (one name per dimension)."""
    current = _ACTIVE.get()
    if current is None:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} axis names {tuple(logical_axes)} for "
                         f"an array of shape {x.shape}")
    layout = current.plan.layout(logical_axes)
    return jax.lax.with_sharding_constraint(
        x, partition_spec(layout, lambda a: a not in current.manual)
    )


def gather(x: jax.Array, layout: Layout) -> jax.Array:
    """All-gather the manual-axis shards of a parameter laid out as `layout` into its full
    (auto-sharded) value."""
    current = _ACTIVE.get()
    if current is None:
        return x
    for dim, axes in enumerate(layout):
        manual = tuple(a for a in axes if a in current.manual)
        if manual:
            x = jax.lax.all_gather(x, manual, axis=dim, tiled=True)
    return checkpoint_name(x, GATHERED)


def _layer_layout(plan: Plan, path: str, logical_axes: tuple[str | None, ...]) -> Layout:
    """Layout of one layer's slice of the stacked parameter whose path ends in `path`
    (a layer module knows only its own paths); its `group_rules` apply."""
    stacked = [p for p in plan.params
               if p.path.endswith("/" + path) and p.logical_axes[1:] == logical_axes]
    layouts = {plan.param_layout(p)[1:] for p in stacked}
    if len(layouts) > 1:
        raise PlanError(f"layer parameter {path} matches {', '.join(p.path for p in stacked)}, "
                        "laid out differently; give their groups the same rules")
    return layouts.pop() if layouts else plan.layout(logical_axes)


def gather_module(module: nnx.Module) -> nnx.Module:
    """A copy of the layer `module` whose parameters are gathered (see `gather`)."""
    plan = _ACTIVE.get().plan
    graphdef, state = nnx.split(module)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, nnx.Param):
            axes = tuple(var.get_metadata().get("out_sharding") or ())
            layout = _layer_layout(plan, "/".join(map(str, path)), axes)
            var = var.replace(gather(var.get_value(), layout))
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def layer(fn: Callable) -> Callable:
    """Mark `fn(module, *args)` as the model's repeated layer: its parameters are gathered
    here, just before use, and recomputed in the backward pass when the plan asks for remat
    (without remat only the gathered copies are recomputed, so they are never all live)."""
    current = _ACTIVE.get()
    if current is None:
        return fn
    current.layer_called = True
    if not current.manual and not current.plan.remat:
        # nothing is gathered, so nothing to recompute; a remat here would also copy the
        # weights into the VJP residuals instead of passing the inputs through (jaxpar.mpmd)
        return fn

    def gathered(module, *args):
        return fn(gather_module(module), *args)

    if current.plan.remat:
        return nnx.remat(gathered)
    return nnx.remat(gathered, policy=jax.checkpoint_policies.save_anything_except_these_names(
        GATHERED))
