"""A loss split for pipelining: what runs before the layer stack, each layer, and after it.

A pipeline cuts a model's layers into chunks: a stack (one module whose parameters have a
leading `layers` axis, built with `nnx.vmap`) or an unrolled list of identical layer modules
(`nnx.List`). `Stages` says where they are and how the loss runs around them; called as
`stages(model, batch)` it is the ordinary unpipelined loss, so one object serves every plan.
`Pieces` turns it into the pure functions a pipeline runtime jits per chunk: `pre(outer,
batch)`, `chunk(stacked, x)` and `post(outer, x, batch)`, over parameter dicts (`outer`:
everything but the layers; `stacked`: the layers, stacked).

The runtimes store the layers as a stack either way: an unrolled list's entries are stacked
leaf by leaf on a leading `layers` axis (`Pieces.stored`), as the planner prices them
(`jaxpar.tracing.graph`), and unstacked again into the model's own structure for the user
(`Pieces.restored`). `Pieces.infos` is the parameter table of what is stored.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar import context
from jaxpar.plan import ParamInfo, PlanError
from jaxpar.tracing.params import ModelFn, abstract_params

Layer = Callable[[nnx.Module, jax.Array], jax.Array]


def run_stack(stack: nnx.Module, x: jax.Array, layer: Layer) -> jax.Array:
    """Apply every layer of `stack` to `x` in order, each through `jaxpar.layer` so the
    active plan gathers its shards and applies remat: a stacked module's layers in
    `nnx.scan`, a list's (`nnx.List`) one by one."""
    if isinstance(stack, nnx.List):
        for module in stack:
            x = context.layer(layer)(module, x)
        return x

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def apply(module: nnx.Module, x: jax.Array) -> jax.Array:
        return context.layer(layer)(module, x)

    return apply(stack, x)


@dataclasses.dataclass(frozen=True)
class Stages:
    """`pre(model, batch) -> x`, then `layer(one_layer, x) -> x` for each layer at attribute
    `stack` (a stacked module or an `nnx.List` of identical modules), then
    `post(model, x, batch) -> loss` (a scalar). `pre` and `post` may use any parameter
    outside the layers, never the layers."""

    stack: str
    pre: Callable[[nnx.Module, Any], jax.Array]
    layer: Layer
    post: Callable[[nnx.Module, jax.Array, Any], jax.Array]

    def __call__(self, model: nnx.Module, batch: Any) -> jax.Array:
        x = self.pre(model, batch)
        x = run_stack(getattr(model, self.stack), x, self.layer)
        return self.post(model, x, batch)


@dataclasses.dataclass(frozen=True)
class Pieces:
    """The pure functions of `stages` for a model, over parameter dicts. `params_shape` and
    `graphdef` are the model's own; `infos` is the table of the parameters as stored
    (`stored`): an unrolled list (`unrolled`) as the stack it equals, at `stack/<path in a
    layer>` with a leading `layers` axis; `layer_graphdef` is one layer's module."""

    stages: Stages
    graphdef: nnx.GraphDef
    layer_graphdef: nnx.GraphDef
    params_shape: dict  # the whole model's parameters as ShapeDtypeStructs
    infos: tuple[ParamInfo, ...]
    num_layers: int
    unrolled: bool = False

    @classmethod
    def of(cls, model_fn: ModelFn, stages: Stages) -> Pieces:
        """Trace `model_fn` once, with shapes only."""
        graphdef, params_shape, infos = abstract_params(model_fn)
        name = stages.stack
        if name not in params_shape:
            raise PlanError(f"the model has no parameters under {name!r} (its "
                            f"top-level entries: {', '.join(sorted(params_shape))}); name the "
                            "attribute holding the layers (a stack or an nnx.List)")
        layers = getattr(nnx.merge(graphdef, params_shape), name)
        if isinstance(layers, nnx.List):
            layer_graphdef = _identical_layers(name, layers, infos)
            return cls(stages, graphdef, layer_graphdef, params_shape,
                       _stacked_infos(name, infos, len(layers)), len(layers), unrolled=True)
        layer_graphdef, _ = nnx.split(layers, nnx.Param)
        sizes = {leaf.shape[0] for leaf in jax.tree.leaves(params_shape[name])}
        if len(sizes) != 1:
            raise PlanError(f"{name!r} is not one stack of layers: its parameters have "
                            f"leading dimensions {sorted(sizes)}; stack the layers on a "
                            "`layers` axis (nnx.vmap) or keep them in an nnx.List of "
                            "identical modules")
        return cls(stages, graphdef, layer_graphdef, params_shape, infos, sizes.pop())

    # ------------------------------------------------------------ parameters
    def stored(self, params: dict) -> dict:
        """The model's parameters as the runtimes store them: an unrolled list's entries
        stacked leaf by leaf on a leading axis (a stacked model's are already)."""
        if not self.unrolled:
            return params
        entries = params[self.stages.stack]
        stack = jax.tree.map(lambda *xs: jnp.stack(xs),
                             *[entries[i] for i in range(self.num_layers)])
        return self.join(self.outer(params), stack)

    def restored(self, params: dict) -> dict:
        """Stored parameters (`stored`) in the model's own structure."""
        if not self.unrolled:
            return params
        stack = self.stacked(params)
        entries = {i: jax.tree.map(lambda x, i=i: x[i], stack) for i in range(self.num_layers)}
        return self.join(self.outer(params), entries)

    @property
    def stored_shape(self) -> dict:
        """`params_shape` as stored."""
        return jax.eval_shape(self.stored, self.params_shape)

    def outer(self, params: dict) -> dict:
        return {k: v for k, v in params.items() if k != self.stages.stack}

    def stacked(self, params: dict) -> dict:
        return params[self.stages.stack]

    def join(self, outer: dict, stacked: Any) -> dict:
        return {**outer, self.stages.stack: stacked}

    def layers(self, stacked: dict, start: int, stop: int) -> dict:
        """Layers [start, stop) of a stack."""
        return jax.tree.map(lambda x: x[start:stop], stacked)

    def part(self, params: dict, start: int, stop: int) -> dict:
        """The stored parameters of a chunk of layers [start, stop): those layers, and for
        the first chunk everything outside the stack too."""
        layers = {self.stages.stack: self.layers(self.stacked(params), start, stop)}
        return {**self.outer(params), **layers} if start == 0 else layers

    # ------------------------------------------------------------- functions
    def _model(self, outer: dict) -> nnx.Module:
        # the layers stay abstract: `pre` / `post` touching them fail loudly, not silently
        return nnx.merge(self.graphdef, self.join(outer, self.stacked(self.params_shape)))

    def pre(self, outer: dict, batch: Any) -> jax.Array:
        return self.stages.pre(self._model(outer), batch)

    def post(self, outer: dict, x: jax.Array, batch: Any) -> jax.Array:
        return self.stages.post(self._model(outer), x, batch)

    def chunk(self, stacked: dict, x: jax.Array) -> jax.Array:
        """Run the layers of `stacked` (a slice of the stack) on `x`; an unrolled model's
        in a `lax.scan`, each layer merged into one list entry's module."""
        if not self.unrolled:
            return run_stack(nnx.merge(self.layer_graphdef, stacked), x, self.stages.layer)

        def one(x: jax.Array, weights: dict) -> tuple[jax.Array, None]:
            module = nnx.merge(self.layer_graphdef, weights)
            return context.layer(self.stages.layer)(module, x), None

        return jax.lax.scan(one, x, stacked)[0]


def _identical_layers(name: str, layers: nnx.List, infos: tuple[ParamInfo, ...]
                      ) -> nnx.GraphDef:
    """The module graph of one entry of the list `layers` (at attribute `name`), after
    checking that every entry has the same parameters (paths, shapes, dtypes, logical axes;
    one shared with another entry is not its own) and modules and attributes, so the entries
    stack; a PlanError names the first difference."""
    table: dict[str, dict[str, tuple]] = defaultdict(dict)
    for info in infos:
        parts = info.path.split("/")
        if parts[0] == name:
            table[parts[1]]["/".join(parts[2:])] = (info.shape, info.dtype, info.logical_axes)

    def described(entry: tuple | None) -> str:
        return "no parameter" if entry is None else (
            f"shape {entry[0]}, {entry[1]}, logical axes {entry[2]}")

    first, first_graph = table["0"], nnx.split(layers[0], nnx.Param)[0]
    for i, module in enumerate(layers):
        params = table[str(i)]
        if params != first:
            path = min(k for k in params.keys() | first.keys() if params.get(k) != first.get(k))
            raise PlanError(
                f"{name!r} is a list of {len(layers)} layers that differ: {name}/{i}/{path} has "
                f"{described(params.get(path))}, {name}/0/{path} has "
                f"{described(first.get(path))}; a pipeline stacks the layers, so they must be "
                "identical modules with parameters of their own")
        if nnx.split(module, nnx.Param)[0] != first_graph:
            raise PlanError(
                f"{name!r} is a list of {len(layers)} layers that differ: {name}/{i} "
                f"({type(module).__name__}) has other submodules or attributes than {name}/0 "
                f"({type(layers[0]).__name__}); a pipeline stacks the layers, so they must be "
                "identical modules")
    return first_graph


def _stacked_infos(name: str, infos: tuple[ParamInfo, ...], num_layers: int
                   ) -> tuple[ParamInfo, ...]:
    """The parameter table with an unrolled list's layers as the stack the runtimes store:
    layer 0's parameters at `name/<path>`, a leading `layers` axis of `num_layers`."""
    table = []
    for info in infos:
        parts = info.path.split("/")
        if parts[0] != name:
            table.append(info)
        elif parts[1] == "0":
            table.append(ParamInfo("/".join([name, *parts[2:]]), (num_layers, *info.shape),
                                   info.dtype, ("layers", *info.logical_axes)))
    return tuple(table)
