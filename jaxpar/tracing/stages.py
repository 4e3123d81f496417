"""A loss split for pipelining: what runs before the layer stack, each layer, and after it.

A pipeline cuts a model's layers into chunks: a stack (one module whose parameters have a
leading `layers` axis, built with `nnx.vmap`) or an unrolled list of identical layer modules
(`nnx.List`). `Stages` says where they are and how the loss runs around them; called as
`stages(model, batch)` it is the ordinary unpipelined loss, so one object serves every plan.
`Pieces` turns it into the pure functions a pipeline runtime jits per chunk: `pre(outer,
variables, batch)`, `chunk(stacked, variables, x)` and `post(outer, variables, x, batch)`,
over parameter dicts (`outer`: everything but the layers; `stacked`: the layers, stacked)
and the matching dicts of the model's other variables (batch statistics, RNG streams: the
layers' are stacked with them), each returning its value and those variables updated.

The runtimes store the layers as a stack either way: an unrolled list's entries are stacked
leaf by leaf on a leading `layers` axis (`Pieces.stored`), as the planner prices them
(`jaxpar.tracing.graph`), and unstacked again into the model's own structure for the user
(`Pieces.restored`); so are their variables. `Pieces.infos` is the parameter table of what
is stored.
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
from jaxpar.emit.variables import of_model, sync_batch_norms
from jaxpar.plan import ParamInfo, PlanError
from jaxpar.tracing.params import ModelFn, abstract_model, path_str

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
    """The pure functions of `stages` for a model, over parameter and variable dicts.
    `params_shape`, `variables` and `graphdef` are the model's own; `infos` is the
    table of the parameters as stored (`stored`): an unrolled list (`unrolled`) as the stack
    it equals, at `stack/<path in a layer>` with a leading `layers` axis; `layer_graphdef` is
    one layer's module. Batch norms without an axis name of their own average their
    statistics over `batch_axes` (the mesh axes a runtime splits the batch over by hand)."""

    stages: Stages
    graphdef: nnx.GraphDef
    layer_graphdef: nnx.GraphDef
    params_shape: dict  # the whole model's parameters as ShapeDtypeStructs
    infos: tuple[ParamInfo, ...]
    num_layers: int
    unrolled: bool = False
    # its other variables (an nnx.State of ShapeDtypeStructs)
    variables: nnx.State = dataclasses.field(default_factory=lambda: nnx.State({}))
    batch_axes: tuple[str, ...] = ()

    @classmethod
    def of(cls, model_fn: ModelFn, stages: Stages) -> Pieces:
        """Trace `model_fn` once, with shapes only."""
        graphdef, params_shape, infos, variables = abstract_model(model_fn)
        name = stages.stack
        if name not in params_shape:
            raise PlanError(f"the model has no parameters under {name!r} (its "
                            f"top-level entries: {', '.join(sorted(params_shape))}); name the "
                            "attribute holding the layers (a stack or an nnx.List)")
        layers = getattr(nnx.merge(graphdef, params_shape, variables), name)
        if isinstance(layers, nnx.List):
            layer_graphdef = _identical_layers(name, layers, infos)
            return cls(stages, graphdef, layer_graphdef, params_shape,
                       _stacked_infos(name, infos, len(layers)), len(layers), unrolled=True,
                       variables=variables)
        layer_graphdef = nnx.split(layers, nnx.Param, ...)[0]
        sizes = {leaf.shape[0] for leaf in jax.tree.leaves(params_shape[name])}
        if len(sizes) != 1:
            raise PlanError(f"{name!r} is not one stack of layers: its parameters have "
                            f"leading dimensions {sorted(sizes)}; stack the layers on a "
                            "`layers` axis (nnx.vmap) or keep them in an nnx.List of "
                            "identical modules")
        return cls(stages, graphdef, layer_graphdef, params_shape, infos, sizes.pop(),
                   variables=variables)

    # ------------------------------------------------ parameters and variables
    # (a dict of either in the model's structure; a model's variables may lack the stack)
    def stored(self, params: dict) -> dict:
        """The model's parameters (or variables) as the runtimes store them: an unrolled
        list's entries stacked leaf by leaf on a leading axis (a stacked model's are
        already)."""
        entries = self.stacked(params)
        if not self.unrolled or not entries:
            return params
        stack = jax.tree.map(lambda *xs: jnp.stack(xs),
                             *[entries[i] for i in range(self.num_layers)])
        return self.join(self.outer(params), stack)

    def restored(self, params: dict) -> dict:
        """Stored parameters or variables (`stored`) in the model's own structure."""
        if not self.unrolled:
            return params
        stack = self.stacked(params)
        entries = {i: jax.tree.map(lambda x, i=i: x[i], stack) for i in range(self.num_layers)}
        return self.join(self.outer(params), entries if stack else {})

    @property
    def stored_shape(self) -> dict:
        """`params_shape` as stored."""
        return jax.eval_shape(self.stored, self.params_shape)

    @property
    def variables_shape(self) -> dict:
        """The model's other variables as a pure dict of ShapeDtypeStructs."""
        return self.variables.to_pure_dict()

    @property
    def stored_variables_shape(self) -> dict:
        """`variables_shape` as stored."""
        return jax.eval_shape(self.stored, self.variables_shape)

    def outer(self, params: dict) -> dict:
        return {k: v for k, v in params.items() if k != self.stages.stack}

    def stacked(self, params: dict) -> dict:
        return params.get(self.stages.stack, {})

    def join(self, outer: dict, stacked: Any) -> dict:
        """`outer` and the stack's entry (none when `stacked` is empty: variables)."""
        return {**outer, self.stages.stack: stacked} if stacked else dict(outer)

    def layers(self, stacked: dict, start: int, stop: int) -> dict:
        """Layers [start, stop) of a stack."""
        return jax.tree.map(lambda x: x[start:stop], stacked)

    def part(self, params: dict, start: int, stop: int) -> dict:
        """The stored parameters of a chunk of layers [start, stop): those layers, and for
        the first chunk everything outside the stack too."""
        layers = self.layers(self.stacked(params), start, stop)
        return self.join(self.outer(params) if start == 0 else {}, layers)

    # ------------------------------------------------------------- functions
    def _merge(self, graphdef: nnx.GraphDef, params: dict, variables: dict) -> nnx.Module:
        module = nnx.merge(graphdef, params, variables)
        sync_batch_norms(module, self.batch_axes)
        return module

    def _model(self, outer: dict, variables: dict) -> nnx.Module:
        # the layers stay abstract: `pre` / `post` touching them fail loudly, not silently
        return self._merge(self.graphdef, self.join(outer, self.stacked(self.params_shape)),
                           self.join(variables, self.stacked(self.variables_shape)))

    def pre(self, outer: dict, variables: dict, batch: Any) -> tuple[jax.Array, dict]:
        """`stages.pre` on parameters and variables outside the stack: its output and those
        variables after it."""
        model = self._model(outer, variables)
        return self.stages.pre(model, batch), of_model(model, variables)

    def post(self, outer: dict, variables: dict, x: jax.Array, batch: Any
             ) -> tuple[jax.Array, dict]:
        """`stages.post` (see `pre`): the loss and the variables outside the stack after it."""
        model = self._model(outer, variables)
        return self.stages.post(model, x, batch), of_model(model, variables)

    def chunk(self, stacked: dict, variables: dict, x: jax.Array) -> tuple[jax.Array, dict]:
        """Run the layers of `stacked` (a slice of the stack) with their `variables` (the
        same slice of the stacked variables) on `x`: the output and the variables after;
        an unrolled model's in a `lax.scan`, each layer merged into one list entry's
        module."""
        if not self.unrolled:
            module = self._merge(self.layer_graphdef, stacked, variables)
            return run_stack(module, x, self.stages.layer), of_model(module, variables)

        def one(x: jax.Array, layer: tuple[dict, dict]) -> tuple[jax.Array, dict]:
            module = self._merge(self.layer_graphdef, *layer)
            return context.layer(self.stages.layer)(module, x), of_model(module, layer[1])

        return jax.lax.scan(one, x, (stacked, variables))


def _identical_layers(name: str, layers: nnx.List, infos: tuple[ParamInfo, ...]
                      ) -> nnx.GraphDef:
    """The module graph of one entry of the list `layers` (at attribute `name`), after
    checking that every entry has the same parameters (paths, shapes, dtypes, logical axes;
    one shared with another entry is not its own), modules, attributes and other variables,
    so the entries stack; a PlanError names the first difference."""
    table: dict[str, dict[str, tuple]] = defaultdict(dict)
    for info in infos:
        parts = info.path.split("/")
        if parts[0] == name:
            table[parts[1]]["/".join(parts[2:])] = (info.shape, info.dtype, info.logical_axes)

    def described(entry: tuple | None) -> str:
        return "no parameter" if entry is None else (
            f"shape {entry[0]}, {entry[1]}, logical axes {entry[2]}")

    first, first_graph = table["0"], nnx.split(layers[0], nnx.Param, ...)[0]
    first_variables = _variable_shapes(layers[0])
    for i, module in enumerate(layers):
        params = table[str(i)]
        if params != first:
            path = min(k for k in params.keys() | first.keys() if params.get(k) != first.get(k))
            raise PlanError(
                f"{name!r} is a list of {len(layers)} layers that differ: {name}/{i}/{path} has "
                f"{described(params.get(path))}, {name}/0/{path} has "
                f"{described(first.get(path))}; a pipeline stacks the layers, so they must be "
                "identical modules with parameters of their own")
        if nnx.split(module, nnx.Param, ...)[0] != first_graph:
            raise PlanError(
                f"{name!r} is a list of {len(layers)} layers that differ: {name}/{i} "
                f"({type(module).__name__}) has other submodules or attributes than {name}/0 "
                f"({type(layers[0]).__name__}); a pipeline stacks the layers, so they must be "
                "identical modules")
        own = _variable_shapes(module)
        if own != first_variables:
            path = min(k for k in own if own[k] != first_variables[k])
            raise PlanError(
                f"{name!r} is a list of {len(layers)} layers that differ: the variable "
                f"{name}/{i}/{path} has shape {own[path][0]}, {own[path][1]}, {name}/0/{path} "
                f"has shape {first_variables[path][0]}, {first_variables[path][1]}; a "
                "pipeline stacks the layers, so they must be identical modules")
    return first_graph


def _variable_shapes(module: nnx.Module) -> dict[str, tuple]:
    """Shape and dtype of each of `module`'s variables that is not a parameter, by path."""
    return {path_str(path): (var.get_value().shape, str(var.get_value().dtype))
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.Param)))}


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
