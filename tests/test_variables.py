"""A model with state beside its parameters: batch normalisation (running statistics the
forward pass updates) and dropout (an RNG stream). Every plan trains it like the plain
single-device program, batch statistics and dropout masks included; the state is
checkpointed; what cannot match is refused before compiling."""

import jax
import numpy as np
import optax
import pytest
import stateful
from flax import nnx
from stateful import CLASSES, WIDTH, Block, kernel

import jaxpar

from oracle import RTOL, checkpointed, host, parallel_steps, single_device_run_with_variables

BATCH = 16


class Net(nnx.Module):
    """Two blocks (each through jaxpar.layer), a classifier head."""

    def __init__(self, rngs, norm: bool = True):
        self.blocks = nnx.List([Block(rngs, norm) for _ in range(2)])
        self.head = nnx.Linear(WIDTH, CLASSES, kernel_init=kernel(("embed", "vocab")),
                               use_bias=False, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = jaxpar.layer(Block.__call__)(block, jaxpar.constrain(x, ("batch", "embed")))
        return self.head(x)


def with_norm(rngs):
    return Net(rngs)


def dropout_only(rngs):
    return Net(rngs, norm=False)


def loss_fn(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def batches(steps=3):
    return stateful.batches(BATCH, steps)


def single_device(model_fn, data):
    """Plain jitted AdamW steps threading the model's non-parameter state, no jaxpar."""
    return single_device_run_with_variables(model_fn, optax.adamw(1e-2), loss_fn, data)


def assert_same(par, state, losses, want):
    want_losses, want_params, want_rest = want
    np.testing.assert_allclose(losses, want_losses, rtol=RTOL)
    for got, expected in ((par.params_of(state), want_params), (state.variables, want_rest)):
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5),
                     host(got), expected)


@pytest.fixture(scope="module")
def reference():
    return single_device(with_norm, batches())


@pytest.mark.parametrize("spec, options", [
    ("dp8", {}), ("fsdp8", {}), ("tp8", {}), ("dp2+fsdp2+tp2", {}),
    ("fsdp4+tp2", {"remat": True}),
])
def test_batch_norm_and_dropout_match_single_device(spec, options, reference):
    par = jaxpar.parallelize(with_norm, optax.adamw(1e-2), loss_fn,
                             jaxpar.named_plan(spec, 8, **options), batches()[0])
    state, losses = parallel_steps(par, batches())
    assert_same(par, state, losses, reference)


@pytest.mark.parametrize("spec, microbatches", [("dp2+fsdp2+tp2", 2), ("dp2+tp4", 4)])
def test_dropout_masks_do_not_depend_on_microbatches(spec, microbatches):
    """Each microbatch of each shard draws its rows of the whole batch's masks."""
    par = jaxpar.parallelize(dropout_only, optax.adamw(1e-2), loss_fn,
                             jaxpar.named_plan(spec, 8, microbatches=microbatches),
                             batches()[0])
    state, losses = parallel_steps(par, batches())
    assert_same(par, state, losses, single_device(dropout_only, batches()))


def test_batch_statistics_refuse_microbatches(compiles):
    plan = jaxpar.named_plan("dp4+tp2", 8, microbatches=2)
    with pytest.raises(jaxpar.PlanError, match=r"blocks/0/norm/mean.*microbatches=1"):
        jaxpar.parallelize(with_norm, optax.sgd(0.1), loss_fn, plan, batches()[0])
    assert not compiles


def test_state_is_checkpointed_and_restored(tmp_path, reference):
    par = jaxpar.parallelize(with_norm, optax.adamw(1e-2), loss_fn,
                             jaxpar.named_plan("dp2+fsdp2+tp2", 8), batches()[0])
    data = batches()
    state, first = parallel_steps(par, data[:2])
    restored = checkpointed(par, state, tmp_path)
    state, last = parallel_steps(par, data[2:], restored)
    assert_same(par, state, first + last, reference)


def test_auto_parallelize_keeps_whole_batches(reference):
    par = jaxpar.auto_parallelize(with_norm, optax.adamw(1e-2), loss_fn, batches()[0],
                                  cluster=jaxpar.local_cluster())
    assert par.plan.microbatches == 1
    state, losses = parallel_steps(par, batches())
    assert_same(par, state, losses, reference)
