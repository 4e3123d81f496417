"""The emitter: a Plan, a model, an optimizer and a loss become a sharded, jitted train step.

Parameters and optimizer state are created by a jitted init whose outputs carry the
plan's shardings, so no full-size array ever exists on one device. The step computes
forward, backward and gradient accumulation over microbatches, then the optax update,
with the state donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpar import context
from jaxpar.devices import make_mesh
from jaxpar.plan import ParamInfo, Plan, PlanError

LossFn = Callable[[nnx.Module, Any], jax.Array]
ModelFn = Callable[[nnx.Rngs], nnx.Module]


class TrainState(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def abstract_params(model_fn: ModelFn) -> tuple[nnx.GraphDef, dict, tuple[ParamInfo, ...]]:
    """Trace the model's constructor with shapes only: its graph, abstract parameters (a
    pure dict of ShapeDtypeStruct) and the table of parameters with their logical axes."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leftover = [_path_str(path) for path, _ in nnx.to_flat_state(rest)]
    if leftover:
        raise PlanError(
            f"jaxpar trains nnx.Param state only; the model also holds {', '.join(leftover)}; "
            "keep RNG streams and other state out of the module"
        )
    infos = []
    for path, var in nnx.to_flat_state(params):
        name = _path_str(path)
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
    return graphdef, params.to_pure_dict(), tuple(infos)


@dataclasses.dataclass(frozen=True)
class Parallelized:
    """A training step laid out by `plan` on `mesh`: `init(rng)` and `step(state, batch)`."""

    plan: Plan
    mesh: Mesh
    state_sharding: TrainState
    batch_sharding: Any
    abstract_state: TrainState
    init: Callable[[jax.Array], TrainState]
    step: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]

    def shard_batch(self, batch: Any) -> Any:
        """Place a host batch on the mesh in the plan's layout."""
        return jax.device_put(batch, self.batch_sharding)

    def lower(self, batch: Any) -> jax.stages.Lowered:
        """The step lowered for `batch`'s shapes, to read its HLO or compile it."""
        return self.step.lower(self.abstract_state, batch)


def parallelize(
    model_fn: ModelFn,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn,
    plan: Plan,
    batch: Any,
    devices: Sequence[jax.Device] | None = None,
) -> Parallelized:
    """Lay out and jit a training step of `model_fn(rngs)` under `plan`.

    `batch` is an example batch (arrays or ShapeDtypeStructs, batch dimension first);
    every check on the plan runs here, before anything compiles.
    """
    devices = list(jax.devices() if devices is None else devices)
    plan.check_devices(len(devices))
    if plan.microbatches < 1 or plan.zero not in (0, 1):
        raise PlanError(f"microbatches must be >= 1 (got {plan.microbatches}) and zero 0 or 1 "
                        f"(got {plan.zero})")
    graphdef, params_shape, infos = abstract_params(model_fn)
    plan = plan.bind(infos)
    for leaf in jax.tree.leaves(batch):
        plan.check_batch(leaf.shape[0])
    mesh = make_mesh(plan, devices)

    by_path = {info.path: info for info in infos}

    def param_sharding(path, _):
        info = by_path[_path_str(path)]
        return NamedSharding(mesh, context.partition_spec(plan.param_layout(info)))

    def optimizer_sharding(path, _):
        info = by_path[_path_str(path)]
        return NamedSharding(mesh, context.partition_spec(plan.optimizer_layout(info)))

    param_shardings = jax.tree_util.tree_map_with_path(param_sharding, params_shape)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shape = jax.eval_shape(optimizer.init, params_shape)
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        opt_shape,
        jax.tree_util.tree_map_with_path(optimizer_sharding, params_shape),
        transform_non_params=lambda _: replicated,
    )
    state_sharding = TrainState(replicated, param_shardings, opt_shardings)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        TrainState(jax.ShapeDtypeStruct((), jnp.int32), params_shape, opt_shape),
        state_sharding,
    )
    batch_spec = PartitionSpec(plan.batch_axes or None)
    batch_sharding = jax.tree.map(lambda _: NamedSharding(mesh, batch_spec), batch)

    def init(rng: jax.Array) -> TrainState:
        with nnx.use_eager_sharding(False):
            model = model_fn(nnx.Rngs(rng))
        params = nnx.state(model, nnx.Param).to_pure_dict()
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    manual = plan.batch_axes
    num_shards = plan.data_parallel_size
    local_param_specs = jax.tree_util.tree_map_with_path(
        lambda path, _: context.partition_spec(
            plan.param_layout(by_path[_path_str(path)]), lambda a: a in manual),
        params_shape,
    )

    def gather_top_level(params: dict) -> dict:
        """Gather the parameters outside the repeated layer (`jaxpar.layer` gathers those)."""
        def gather(path, x):
            axes = by_path[_path_str(path)].logical_axes
            return x if "layers" in axes else context.gather(x, axes)
        return jax.tree_util.tree_map_with_path(gather, params)

    def local_loss(params: dict, batch: Any) -> jax.Array:
        return loss_fn(nnx.merge(graphdef, gather_top_level(params)), batch)

    def local_loss_and_grads(params: dict, batch: Any) -> tuple[jax.Array, dict]:
        """On one batch shard: mean loss and the gradient summed over all shards (autodiff
        of the gathers and of the replicated parameters emits the reductions)."""
        m = plan.microbatches
        if m == 1:
            loss, grads = jax.value_and_grad(local_loss)(params, batch)
        else:
            def body(carry, micro):
                loss, grads = jax.value_and_grad(local_loss)(params, micro)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            # row i*m + j of the shard goes to microbatch j
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1), batch)
            first = jax.value_and_grad(local_loss)(params, jax.tree.map(lambda x: x[0], micro))
            rest = jax.tree.map(lambda x: x[1:], micro)
            (loss, grads), _ = jax.lax.scan(body, first, rest)
            loss, grads = jax.tree.map(lambda x: x / m, (loss, grads))
        if manual:
            loss = jax.lax.pmean(loss, manual)
        return loss, jax.tree.map(lambda g: g / num_shards, grads)

    if manual:
        loss_and_grads = jax.shard_map(
            local_loss_and_grads,
            mesh=mesh,
            in_specs=(local_param_specs, PartitionSpec(manual)),
            out_specs=(PartitionSpec(), local_param_specs),
            axis_names=set(manual),
        )
    else:
        loss_and_grads = local_loss_and_grads

    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            with context.active(plan, manual) as active:
                loss, grads = loss_and_grads(state.params, batch)
        if plan.remat and not active.layer_called:
            raise PlanError("the plan asks for remat but the model never wraps a layer in "
                            "jaxpar.layer; wrap its repeated block or set remat=False")
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return Parallelized(
        plan=plan,
        mesh=mesh,
        state_sharding=state_sharding,
        batch_sharding=batch_sharding,
        abstract_state=abstract_state,
        init=jax.jit(init, out_shardings=state_sharding),
        step=jax.jit(
            train_step,
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        ),
    )
