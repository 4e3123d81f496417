"""A loss split for pipelining: what runs before the layer stack, each layer, and after it.

A pipeline cuts a model's stacked layers (one module whose parameters have a leading
`layers` axis, built with `nnx.vmap`) into chunks. `Stages` says where the stack is and how
the loss runs around it; called as `stages(model, batch)` it is the ordinary unpipelined
loss, so one object serves every plan. `Pieces` turns it into the pure functions a pipeline
runtime jits per chunk: `pre(outer, batch)`, `chunk(stacked, x)` and `post(outer, x, batch)`,
over parameter dicts (`outer`: everything but the stack; `stacked`: the stack's layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jaxpar import context
from jaxpar.plan import ParamInfo, PlanError
from jaxpar.tracing.params import ModelFn, abstract_params

Layer = Callable[[nnx.Module, jax.Array], jax.Array]


def run_stack(stack: nnx.Module, x: jax.Array, layer: Layer) -> jax.Array:
    """Apply every layer of the stacked module `stack` to `x` in order (`nnx.scan`), each
    through `jaxpar.layer` so the active plan gathers its shards and applies remat."""

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def apply(module: nnx.Module, x: jax.Array) -> jax.Array:
        return context.layer(layer)(module, x)

    return apply(stack, x)


@dataclasses.dataclass(frozen=True)
class Stages:
    """`pre(model, batch) -> x`, then `layer(one_layer, x) -> x` for each layer of the
    stacked module at attribute `stack`, then `post(model, x, batch) -> loss` (a scalar).
    `pre` and `post` may use any parameter outside the stack, never the stack."""

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
    """The pure functions of `stages` for a model, over parameter dicts."""

    stages: Stages
    graphdef: nnx.GraphDef
    layer_graphdef: nnx.GraphDef
    params_shape: dict  # the whole model's parameters as ShapeDtypeStructs
    infos: tuple[ParamInfo, ...]
    num_layers: int

    @classmethod
    def of(cls, model_fn: ModelFn, stages: Stages) -> Pieces:
        """Trace `model_fn` once, with shapes only."""
        graphdef, params_shape, infos = abstract_params(model_fn)
        if stages.stack not in params_shape:
            raise PlanError(f"the model has no parameters under {stages.stack!r} (its "
                            f"top-level entries: {', '.join(sorted(params_shape))}); name the "
                            "attribute holding the stacked layers")
        model = nnx.merge(graphdef, params_shape)
        layer_graphdef, _ = nnx.split(getattr(model, stages.stack), nnx.Param)
        sizes = {leaf.shape[0] for leaf in jax.tree.leaves(params_shape[stages.stack])}
        if len(sizes) != 1:
            raise PlanError(f"{stages.stack!r} is not one stack of layers: its parameters have "
                            f"leading dimensions {sorted(sizes)}")
        return cls(stages, graphdef, layer_graphdef, params_shape, infos, sizes.pop())

    # ------------------------------------------------------------ parameters
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
        """The parameters of a chunk of layers [start, stop): those layers, and for the
        first chunk everything outside the stack too."""
        layers = {self.stages.stack: self.layers(self.stacked(params), start, stop)}
        return {**self.outer(params), **layers} if start == 0 else layers

    # ------------------------------------------------------------- functions
    def _model(self, outer: dict) -> nnx.Module:
        # the stack stays abstract: `pre` / `post` touching it fail loudly, not silently
        return nnx.merge(self.graphdef, self.join(outer, self.stacked(self.params_shape)))

    def pre(self, outer: dict, batch: Any) -> jax.Array:
        return self.stages.pre(self._model(outer), batch)

    def post(self, outer: dict, x: jax.Array, batch: Any) -> jax.Array:
        return self.stages.post(self._model(outer), x, batch)

    def chunk(self, stacked: dict, x: jax.Array) -> jax.Array:
        """Run the layers of `stacked` (a slice of the stack) on `x`."""
        return run_stack(nnx.merge(self.layer_graphdef, stacked), x, self.stages.layer)
