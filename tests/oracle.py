"""The correctness oracle: the plain single-device training program, written without jaxpar."""

import jax
import numpy as np
import optax
from flax import nnx


def single_device_run(model_fn, optimizer, loss_fn, batches, seed: int = 0):
    """Losses and final parameters (pure dict of numpy) of plain jitted steps on one device."""
    device = jax.devices()[0]
    with jax.default_device(device), nnx.use_eager_sharding(False):
        model = model_fn(nnx.Rngs(jax.random.key(seed)))
        graphdef, params = nnx.split(model, nnx.Param)
        params = params.to_pure_dict()
        opt_state = optimizer.init(params)

        @jax.jit
        def step(params, opt_state, batch):
            def loss_of(p):
                return loss_fn(nnx.merge(graphdef, p), batch)

            loss, grads = jax.value_and_grad(loss_of)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        losses = []
        for batch in batches:
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(float(loss))
    return np.array(losses), jax.tree.map(np.asarray, params)
