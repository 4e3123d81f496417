"""The correctness oracle: the plain single-device training program, written without jaxpar,
and the comparison every parallel feature is held to.

fp32 on CPU: a parallel plan only changes the order of sums, so gradients agree to ~1e-7.
Tolerances: losses 1e-4 relative. With SGD every parameter entry within 1e-4 relative
(+1e-7 absolute for entries near 0). AdamW divides by sqrt(v) + 1e-8, so entries whose
gradient is fp32 noise (~1e-9, true value 0) step by up to +-lr in either run; there each
tensor is compared as a whole: ||got - want|| / ||want|| <= 1e-4.
"""

import jax
import numpy as np
import optax
from flax import nnx

RTOL, ATOL = 1e-4, 1e-7


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


def parallel_run(par, batches, seed: int = 0):
    """Losses and final parameters of a `jaxpar.Parallelized` step over `batches`."""
    state = par.init(jax.random.key(seed))
    losses = []
    for batch in batches:
        state, metrics = par.step(state, par.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.tree.map(np.asarray, par.params_of(state))


def token_batches(batch: int = 16, length: int = 32, steps: int = 3, vocab: int = 256):
    """Random next-token batches for the language-model loss."""
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, vocab, (batch, length + 1)).astype(np.int32) for _ in range(steps)]
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def assert_same_run(got, want, elementwise: bool):
    """Losses within RTOL; parameters entry by entry (SGD) or tensor by tensor (AdamW)."""
    got_losses, got_params = got
    want_losses, want_params = want
    np.testing.assert_allclose(got_losses, want_losses, rtol=RTOL)

    def same(g, w):
        if elementwise:
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)
        else:
            assert np.linalg.norm(g - w) <= RTOL * np.linalg.norm(w)

    jax.tree.map(same, got_params, want_params)


def host(tree):
    """Numpy copies of a pytree's arrays, typed PRNG keys as their key data."""
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), tree)


def single_device_run_with_variables(model_fn, optimizer, loss_fn, batches, seed: int = 0):
    """`single_device_run` of a model with variables besides its parameters (batch
    statistics, RNG streams), threaded through the steps as plain Flax does: losses, final
    parameters and final variables (`host`)."""
    with jax.default_device(jax.devices()[0]), nnx.use_eager_sharding(False):
        graphdef, params, rest = nnx.split(model_fn(nnx.Rngs(jax.random.key(seed))),
                                           nnx.Param, ...)
        params, rest = params.to_pure_dict(), rest.to_pure_dict()
        opt_state = optimizer.init(params)

        @jax.jit
        def step(params, rest, opt_state, batch):
            def loss(p):
                model = nnx.merge(graphdef, p, rest)
                return loss_fn(model, batch), nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()

            (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), rest, opt_state, value

        losses = []
        for batch in batches:
            params, rest, opt_state, value = step(params, rest, opt_state, batch)
            losses.append(float(value))
    return losses, host(params), host(rest)


def parallel_steps(par, batches, state=None, seed: int = 0):
    """The state after `par.step` over `batches` from `state` (default: `par.init`), and the
    losses."""
    state = par.init(jax.random.key(seed)) if state is None else state
    losses = []
    for batch in batches:
        state, metrics = par.step(state, par.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    return state, losses


def checkpointed(par, state, directory, step: int = 2):
    """`state` saved as `step` by `par.checkpointer` in `directory`, then restored by a new
    checkpointer there (what a restarted run reads)."""
    ckpt = par.checkpointer(directory, save_every=1)
    ckpt.save(step, state, force=True)
    ckpt.close()
    return par.checkpointer(directory, save_every=1).restore()
