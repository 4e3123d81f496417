"""A pipelined model with state beside its parameters: batch normalisation and dropout in the
stacked layers (each layer its own RNG stream and statistics, `nnx.split_rngs` +
`nnx.vmap`), dropout before and after them. Both pipeline forms train it like the plain
single-device program, dropout masks and batch statistics included: dropout under any
microbatch count, batch norms with microbatches=1 (GPipe and 1F1B accept it; more is refused
before compiling). The variables are checkpointed and restored in each form's layout."""

import functools

import jax
import numpy as np
import optax
import pytest
import stateful
from flax import nnx
from stateful import CLASSES, WIDTH, Block, kernel

import jaxpar
from jaxpar.plan import Pipeline

from oracle import (
    ATOL,
    RTOL,
    assert_same_run,
    checkpointed,
    host,
    parallel_steps,
    single_device_run_with_variables,
)

BATCH, LAYERS = 32, 4


class Net(nnx.Module):
    """An input projection with dropout, a stack of blocks (stacked with nnx.vmap, or an
    nnx.List), dropout and a classifier head."""

    def __init__(self, rngs, norm: bool = True, unrolled: bool = False):
        self.embed = nnx.Linear(WIDTH, WIDTH, kernel_init=kernel(("vocab", "embed")),
                                use_bias=False, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        if unrolled:
            self.blocks = nnx.List([Block(rngs, norm) for _ in range(LAYERS)])
        else:
            @nnx.split_rngs(splits=LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stack(rngs):
                return Block(rngs, norm)

            self.blocks = stack(rngs)
        self.head_drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, kernel_init=kernel(("embed", "vocab")),
                               use_bias=False, rngs=rngs)


def _pre(model, batch):
    return model.drop(model.embed(batch["x"]))


def _post(model, x, batch):
    logits = model.head(model.head_drop(x))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


STAGES = jaxpar.Stages("blocks", _pre, lambda block, x: block(x), _post)
MODELS = {
    "norm": Net,
    "dropout": functools.partial(Net, norm=False),
    "dropout-unrolled": functools.partial(Net, norm=False, unrolled=True),
}


def batches(steps=3):
    return stateful.batches(BATCH, steps)


def adamw():
    return optax.adamw(1e-2)


@functools.cache
def single_device(model: str):
    """Plain jitted AdamW steps on the Stages as the loss, threading the model's
    non-parameter state, no jaxpar: losses, parameters, variables (keys as their data)."""
    return single_device_run_with_variables(MODELS[model], adamw(), STAGES, batches())


def assert_same(par, state, losses, want):
    """Losses and parameters as one device's (`oracle.assert_same_run`, AdamW); variables too:
    RNG keys and counts exactly, statistics within RTOL."""
    want_losses, want_params, want_rest = want
    assert_same_run((losses, host(par.params_of(state))), (want_losses, want_params),
                    elementwise=False)

    def same(got, expected):
        if np.issubdtype(expected.dtype, np.floating):
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
        else:
            np.testing.assert_array_equal(got, expected)

    jax.tree.map(same, host(par.variables_of(state)), want_rest)


# name: (model, plan, pipeline, microbatches, remat)
CASES = {
    "spmd-1f1b-dp-tp-m4": ("dropout", "pp2+dp2+tp2", Pipeline("1f1b", form="spmd"), 4, "dots"),
    "spmd-interleaved-fsdp-m4": ("dropout", "pp2+fsdp4",
                                 Pipeline("interleaved_1f1b", virtual=2, form="spmd"), 4,
                                 "full"),
    "spmd-zb-tp-m4": ("dropout", "pp2+tp4", Pipeline("zero_bubble_h1", form="spmd"), 4, "dots"),
    "spmd-1f1b-unrolled-m4": ("dropout-unrolled", "pp2+dp4", Pipeline("1f1b", form="spmd"), 4,
                              "dots"),
    "mpmd-1f1b-dp-m4": ("dropout", "pp2+dp4", Pipeline("1f1b", form="mpmd"), 4, "none"),
    "mpmd-zb-fsdp-tp-m4": ("dropout", "pp2+fsdp2+tp2", Pipeline("zero_bubble_h1", form="mpmd"),
                           4, "full"),
    "spmd-gpipe-norm-m1": ("norm", "pp2+dp2+tp2", Pipeline("gpipe", form="spmd"), 1, "full"),
    "spmd-1f1b-norm-m1": ("norm", "pp2+fsdp4", Pipeline("1f1b", form="spmd"), 1, "dots"),
    "mpmd-gpipe-norm-m1": ("norm", "pp2+dp4", Pipeline("gpipe", form="mpmd"), 1, "none"),
    "mpmd-1f1b-norm-m1": ("norm", "pp2+fsdp2+tp2", Pipeline("1f1b", form="mpmd"), 1, "full"),
}


@functools.cache
def pipelined(case: str):
    """One case's runtime, shared by the tests (its programs compile once)."""
    model, spec, pipeline, m, remat = CASES[case]
    plan = jaxpar.named_plan(spec, 8, microbatches=m, pipeline=pipeline, remat=remat)
    return jaxpar.parallelize(MODELS[model], adamw(), STAGES, plan, batches()[0])


@pytest.mark.parametrize("case", CASES)
def test_pipeline_trains_like_single_device(case):
    """Each microbatch of each batch shard draws its rows of the whole batch's masks, B and
    W redraw F's; batch norms see the whole batch; the step returns the variables one
    forward pass leaves, in the model's own structure."""
    par = pipelined(case)
    state, losses = parallel_steps(par, batches())
    assert_same(par, state, losses, single_device(CASES[case][0]))


@pytest.mark.parametrize("case", ["spmd-gpipe-norm-m1", "mpmd-1f1b-norm-m1"])
def test_variables_are_checkpointed_and_restored(case, tmp_path):
    par = pipelined(case)
    data = batches()
    state, first = parallel_steps(par, data[:2])
    restored = checkpointed(par, state, tmp_path)
    jax.tree.map(lambda x, want: x.sharding.is_equivalent_to(want.sharding, x.ndim) or
                 pytest.fail(f"restored {x.sharding}, the step's layout is {want.sharding}"),
                 restored, par.abstract_state)
    state, last = parallel_steps(par, data[2:], restored)
    assert_same(par, state, first + last, single_device("norm"))


@pytest.mark.parametrize("form", ["spmd", "mpmd"])
def test_batch_statistics_refuse_microbatches_under_a_pipeline(form, compiles):
    plan = jaxpar.named_plan("pp2+dp4", 8, microbatches=4, remat="dots",
                             pipeline=Pipeline("1f1b", form=form))
    with pytest.raises(jaxpar.PlanError, match=r"blocks/norm/mean.*microbatches=4.*"
                                               r"microbatches=1, which the gpipe and 1f1b"):
        jaxpar.parallelize(MODELS["norm"], adamw(), STAGES, plan, batches()[0])
    assert not compiles
