"""The train state every form carries, how step 0 is made and how one update applies."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpar.tracing.params import ModelFn


class TrainState(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def init_state(model_fn: ModelFn, optimizer: optax.GradientTransformation, rng: jax.Array,
               layout: Callable[[dict], dict] = lambda params: params) -> TrainState:
    """Step 0: the model's parameters (in the runtime's `layout`) and optimizer state; jit it
    with output shardings so each device creates only its shard."""
    with nnx.use_eager_sharding(False):
        model = model_fn(nnx.Rngs(rng))
    params = layout(nnx.state(model, nnx.Param).to_pure_dict())
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def apply_gradients(optimizer: optax.GradientTransformation, state: TrainState,
                    grads: dict) -> TrainState:
    """One optax update of `state` by `grads`."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
