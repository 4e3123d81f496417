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
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from jaxpar.plan import Layout, Plan, PlanError
from jaxpar.tracing.params import path_str


def _save_all_but_gathers(primitive, *_, **__) -> bool:
    """Remat policy "none": save every intermediate except all-gather results, so the
    backward pass gathers the weights again rather than holding every layer's gathered copy
    from forward to backward. The weights must be refused at the all_gather: refusing a
    name (`checkpoint_name`) on them saves the gather's output, the same bytes, in its
    place. Inside a layer the only all-gathers are jaxpar's (models leave the automatic
    axes to GSPMD)."""
    return primitive is not jax.lax.all_gather_p


# each policy of `plan.REMAT` as a jax.checkpoint policy (None: save nothing but the inputs);
# dots_saveable saves no all-gather either
_POLICIES = {"none": _save_all_but_gathers, "dots": jax.checkpoint_policies.dots_saveable,
             "full": None}


@dataclasses.dataclass
class Active:
    """The plan a trace follows. `unrolled`: paths of the parameters of layers the model
    keeps unstacked (each module passed to `layer` on its own), which `layer` gathers;
    `paths`: the traced model's variables by identity, to their paths (see `merge`);
    `seen`: the unrolled layer parameters `layer` has met."""

    plan: Plan
    manual: tuple[str, ...]
    unrolled: frozenset[str] = frozenset()
    layer_called: bool = False
    paths: dict[int, str] = dataclasses.field(default_factory=dict)
    seen: set[str] = dataclasses.field(default_factory=set)


_ACTIVE: contextvars.ContextVar[Active | None] = contextvars.ContextVar("jaxpar", default=None)


def partition_spec(layout: Layout, keep: Callable[[str], bool] = lambda _: True) -> PartitionSpec:
    """PartitionSpec of a layout, keeping only the mesh axes `keep` accepts."""
    entries = [tuple(a for a in axes if keep(a)) for axes in layout]
    return PartitionSpec(*(e if e else None for e in entries))


@contextlib.contextmanager
def active(plan: Plan, manual: Sequence[str],
           unrolled: frozenset[str] = frozenset()) -> Iterator[Active]:
    """Make `plan` the one `constrain` and `layer` follow, with `manual` mesh axes manual
    (`unrolled`: see `Active`)."""
    token = _ACTIVE.set(Active(plan, tuple(manual), frozenset(unrolled)))
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
    layout = current.plan.layout(logical_axes, shape=x.shape)
    if not jax.sharding.get_abstract_mesh().axis_names:
        return x  # a program on one device without mesh axes (a pp8 stage): nothing to lay out
    return jax.lax.with_sharding_constraint(
        x, partition_spec(layout, lambda a: a not in current.manual)
    )


def gather(x: jax.Array, layout: Layout) -> jax.Array:
    """All-gather the manual-axis shards of a parameter laid out as `layout` into its full
    (auto-sharded) value; autodiff makes the transpose a reduce-scatter of the gradient.
    See `gather_all`."""
    return gather_all([x], [layout])[0]


def gather_all(xs: Sequence[jax.Array], layouts: Sequence[Layout]) -> list[jax.Array]:
    """`gather` of several parameters at once (a layer's), in one program region: one
    `shard_map` and, for grad_reduce="all-reduce", one custom VJP for all of them, which
    keeps tracing and lowering short.

    A parameter also split over an automatic axis (`tensor`) is gathered inside a `shard_map`
    manual over those axes too, whose specs are its automatic layout: each device then
    gathers (and reduce-scatters) only its 1/t slice. A bare all_gather over a manual axis
    makes XLA first replicate the operand over the automatic ones, so every device would
    gather whole weights. A dimension split over both manual and automatic axes is left
    whole in those specs (gathering blocks spread across two axes would reorder them)."""
    current = _ACTIVE.get()
    if current is None:
        return list(xs)
    manual = [[tuple(a for a in axes if a in current.manual) for axes in layout]
              for layout in layouts]
    todo = [i for i, dims in enumerate(manual) if any(dims)]
    if not todo:
        return list(xs)
    manual = [manual[i] for i in todo]

    def all_gather(vs: list[jax.Array]) -> list[jax.Array]:
        out = []
        for v, dims in zip(vs, manual):
            for dim, axes in enumerate(dims):
                if axes:
                    v = jax.lax.all_gather(v, axes, axis=dim, tiled=True)
            out.append(v)
        return out

    if current.plan.grad_reduce == "all-reduce":
        all_gather = _sliced_transpose(all_gather, manual)
    kept = [[() if gathered else tuple(axes) for gathered, axes in zip(dims, layouts[i])]
            for dims, i in zip(manual, todo)]
    split = {a for dims in kept for axes in dims for a in axes}
    if split:
        specs = [PartitionSpec(*(axes or None for axes in dims)) for dims in kept]
        all_gather = jax.shard_map(all_gather, in_specs=(specs,), out_specs=specs,
                                   axis_names=split)
    out = list(xs)
    for i, value in zip(todo, all_gather([xs[i] for i in todo])):
        out[i] = value
    return out


def _sliced_transpose(all_gather: Callable[[list], list],
                      manual: Sequence[Sequence[tuple[str, ...]]]) -> Callable[[list], list]:
    """`all_gather` (of a list) whose transpose all-reduces the whole gradients and keeps this
    device's slice of each (the plan's grad_reduce="all-reduce") instead of
    reduce-scattering them."""
    @jax.custom_vjp
    def gathered(vs: list) -> list:
        return all_gather(vs)

    def forward(vs: list) -> tuple[list, None]:
        return all_gather(vs), None

    def backward(_, gs: list) -> tuple[list]:
        out = []
        for g, dims in zip(gs, manual):
            g = jax.lax.psum(g, tuple(a for dim_axes in dims for a in dim_axes))
            for dim, dim_axes in enumerate(dims):
                if dim_axes:
                    size = g.shape[dim] // jax.lax.axis_size(dim_axes)
                    g = jax.lax.dynamic_slice_in_dim(g, jax.lax.axis_index(dim_axes) * size,
                                                     size, dim)
            out.append(g)
        return (out,)

    gathered.defvjp(forward, backward)
    return gathered


def merge(graphdef: nnx.GraphDef, *states: Any) -> nnx.Module:
    """`nnx.merge`, the model's variables recorded by identity in the active trace, so that
    `layer` knows the full path of an unrolled layer's parameters."""
    model = nnx.merge(graphdef, *states)
    current = _ACTIVE.get()
    if current is not None:
        current.paths = {id(var): path_str(path) for path, var in nnx.iter_graph(model)
                         if isinstance(var, nnx.Variable)}
    return model


def _stacked_layout(plan: Plan, path: str, logical_axes: tuple[str | None, ...]) -> Layout:
    """Layout of one layer's slice of the stacked parameter whose path ends in `path`
    (a layer module knows only its own paths); its `group_rules` apply."""
    stacked = [p for p in plan.params
               if p.path.endswith("/" + path) and p.logical_axes[1:] == logical_axes]
    layouts = {plan.param_layout(p)[1:] for p in stacked}
    if len(layouts) > 1:
        raise PlanError(f"layer parameter {path} matches {', '.join(p.path for p in stacked)}, "
                        "laid out differently; give their groups the same rules")
    if layouts:
        return layouts.pop()
    if plan.params:
        raise PlanError(f"jaxpar.layer got a module whose parameter {path} is neither the "
                        "model's own (an unrolled layer) nor a layer of a stack; pass "
                        "jaxpar.layer the model's module itself, not a copy (nnx.remat, "
                        "nnx.jit or clone make one)")
    return plan.layout(logical_axes)


def _param_paths(module: nnx.Module, current: Active) -> dict[str, str]:
    """The full paths of `module`'s parameters, by their paths inside it, when they are the
    traced model's own variables (an unrolled layer; a stacked one is a copy `nnx.scan`
    made, which has none)."""
    return {path_str(path): current.paths[id(var)] for path, var in nnx.iter_graph(module)
            if isinstance(var, nnx.Param) and id(var) in current.paths}


def gather_module(module: nnx.Module, full_paths: dict[str, str]) -> nnx.Module:
    """A copy of the layer `module` whose parameters are gathered (see `gather_all`); a
    parameter with a full path (`_param_paths`) is laid out as the plan lays out that one,
    any other as the stack whose layer it is."""
    plan = _ACTIVE.get().plan
    infos = {info.path: info for info in plan.params}
    graphdef, state = nnx.split(module)
    flat = list(nnx.to_flat_state(state))
    params = [(n, var) for n, (_, var) in enumerate(flat) if isinstance(var, nnx.Param)]
    layouts = []
    for n, var in params:
        path = path_str(flat[n][0])
        full = infos.get(full_paths.get(path))
        layouts.append(plan.param_layout(full) if full else _stacked_layout(
            plan, path, tuple(var.get_metadata().get("out_sharding") or ())))
    values = gather_all([var.get_value() for _, var in params], layouts)
    for (n, var), value in zip(params, values):
        flat[n] = (flat[n][0], var.replace(value))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _gathers_layers(current: Active) -> bool:
    """Whether some layer parameter (of the stack or an unrolled layer) is split over a
    manual axis, so `layer` gathers it; a plan without a parameter table (`Plan.bind` not
    called) is assumed to."""
    if not current.manual:
        return False
    if not current.plan.params:
        return True
    return any(a in current.manual for p in current.plan.params
               if "layers" in p.logical_axes or p.path in current.unrolled
               for axes in current.plan.param_layout(p) for a in axes)


def layer(fn: Callable) -> Callable:
    """Mark `fn(module, *args)` as the model's repeated layer: its parameters are gathered
    here, just before use, and what the plan's remat policy does not save is recomputed in
    the backward pass (under every policy the gathered copies are, so they are never all
    live). The layer is one layer of a stack applied by `nnx.scan` (`run_stack`) or a module
    of its own (a list of blocks, each passed here)."""
    current = _ACTIVE.get()
    if current is None:
        return fn
    current.layer_called = True

    def run(module: nnx.Module, *args):
        full_paths = _param_paths(module, current)
        current.seen.update(full_paths.values())
        if current.plan.remat == "none" and not _gathers_layers(current):
            # nothing is gathered, so nothing to recompute; a remat here would also copy the
            # weights into the VJP residuals instead of passing the inputs through
            # (jaxpar.emit.mpmd) and add work of its own (25 more fusions per dp8 GPT step)
            return fn(module, *args)

        def gathered(module, *args):
            return fn(gather_module(module, full_paths), *args)

        return nnx.remat(gathered, policy=_POLICIES[current.plan.remat])(module, *args)

    return run
