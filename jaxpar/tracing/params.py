"""Trace a model's constructor with shapes only: its parameters and their logical axes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from jaxpar.plan import ParamInfo, PlanError

ModelFn = Callable[[nnx.Rngs], nnx.Module]
LossFn = Callable[[nnx.Module, Any], jax.Array]


def path_str(path: Sequence[Any]) -> str:
    """'blocks/mlp/up/kernel' for a pytree or nnx state path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def abstract_model(model_fn: ModelFn
                   ) -> tuple[nnx.GraphDef, dict, tuple[ParamInfo, ...], nnx.State]:
    """The model's graph, its parameters as a pure dict of ShapeDtypeStruct, the table of
    parameters with their logical axes, and its other variables (batch statistics, RNG
    streams: every `nnx.Variable` that is not an `nnx.Param`) as an nnx.State of
    ShapeDtypeStruct; nothing is allocated."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
    graphdef, params, variables = nnx.split(model, nnx.Param, ...)
    infos = []
    for path, var in nnx.to_flat_state(params):
        name = path_str(path)
        axes = var.get_metadata().get("out_sharding")
        if axes is None and var.ndim > 0:
            raise PlanError(
                f"parameter {name} (shape {var.shape}) has no logical axes; create it with "
                "nnx.with_partitioning(init, names) or nnx.Param(..., out_sharding=names)"
            )
        axes = tuple(axes or ())
        if len(axes) != var.ndim:
            raise PlanError(f"parameter {name} has shape {var.shape} but logical axes {axes}")
        infos.append(ParamInfo(name, tuple(var.shape), str(var.dtype), axes))
    return graphdef, params.to_pure_dict(), tuple(infos), variables


def variable_paths(variables: nnx.State) -> list[str]:
    return [path_str(path) for path, _ in nnx.to_flat_state(variables)]


def statistics(variables: nnx.State) -> list[str]:
    """Paths of the variables that are not RNG streams (batch statistics and the like)."""
    return [path_str(path) for path, var in nnx.to_flat_state(variables)
            if not isinstance(var, nnx.RngState)]


def abstract_params(model_fn: ModelFn) -> tuple[nnx.GraphDef, dict, tuple[ParamInfo, ...]]:
    """`abstract_model` of a model whose only state is its parameters (no batch statistics,
    no RNG streams)."""
    graphdef, params, infos, variables = abstract_model(model_fn)
    if variable_paths(variables):
        raise PlanError(
            f"the model holds {', '.join(variable_paths(variables))} besides its parameters; "
            "trace it with abstract_model, which returns those variables too"
        )
    return graphdef, params, infos
