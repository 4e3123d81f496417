"""The train state every form carries, how step 0 is made and how one update applies."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxpar.tracing.params import ModelFn


class TrainState(NamedTuple):
    """`params`: the model's `nnx.Param`s (pure dict), which the optimizer trains;
    `variables`: its other variables (batch statistics, RNG streams), which the forward pass
    updates."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    variables: dict = {}


def init_state(model_fn: ModelFn, optimizer: optax.GradientTransformation, rng: jax.Array,
               layout: Callable[[dict], dict] = lambda params: params) -> TrainState:
    """Step 0: the model's parameters (in the runtime's `layout`), optimizer state and other
    variables; jit it with output shardings so each device creates only its shard."""
    with nnx.use_eager_sharding(False):
        model = model_fn(nnx.Rngs(rng))
    params = layout(nnx.state(model, nnx.Param).to_pure_dict())
    variables = nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), variables)


def updates_parts_alone(optimizer: optax.GradientTransformation, params: dict,
                        parts: Callable[[dict], list[dict]], steps: int = 3) -> bool:
    """Whether `optimizer` updates each part of `params` (`parts(tree)`: a list of trees) alike
    on its own and inside the whole tree, over `steps` updates. The gradients are random with
    a random scale per leaf and step (1e-2 to 1e2), so an update that couples the parts
    (optax.clip_by_global_norm; a trust ratio over a leaf the parts split) shows."""
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: (rng.normal(size=p.shape) * 10.0 ** rng.uniform(-2, 2)
                                     ).astype(p.dtype), params) for _ in range(steps)]

    def run(p: dict, gradients: list[dict]) -> dict:
        state = optimizer.init(p)
        for g in gradients:
            updates, state = optimizer.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    whole = parts(run(params, grads))
    alone = [run(part, [parts(g)[i] for g in grads]) for i, part in enumerate(parts(params))]
    return all(np.allclose(a, w, rtol=1e-4, atol=1e-6)
               for a, w in zip(jax.tree.leaves(alone), jax.tree.leaves(whole)))


def apply_gradients(optimizer: optax.GradientTransformation, state: TrainState,
                    grads: dict, variables: dict | None = None) -> TrainState:
    """One optax update of `state` by `grads`; `variables` replace the state's (default:
    kept)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state,
                      state.variables if variables is None else variables)
