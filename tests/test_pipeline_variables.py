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
from flax import nnx

import jaxpar
from jaxpar.plan import Pipeline

from oracle import ATOL, RTOL, assert_same_run

WIDTH, CLASSES, BATCH, LAYERS = 32, 8, 32, 4


def _init(axes):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)


class Block(nnx.Module):
    def __init__(self, rngs, norm: bool):
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, kernel_init=_init(("embed", "mlp")),
                             use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(
            2 * WIDTH, rngs=rngs,
            scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("mlp",)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",))
        ) if norm else None
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, kernel_init=_init(("mlp", "embed")),
                               use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = jaxpar.constrain(self.up(x), ("batch", "mlp"))
        h = self.norm(h) if self.norm is not None else h
        return x + self.down(jaxpar.constrain(self.drop(jax.nn.relu(h)), ("batch", "mlp")))


class Net(nnx.Module):
    """An input projection with dropout, a stack of blocks (stacked with nnx.vmap, or an
    nnx.List), dropout and a classifier head."""

    def __init__(self, rngs, norm: bool = True, unrolled: bool = False):
        self.embed = nnx.Linear(WIDTH, WIDTH, kernel_init=_init(("vocab", "embed")),
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
        self.head = nnx.Linear(WIDTH, CLASSES, kernel_init=_init(("embed", "vocab")),
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
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(BATCH, WIDTH)).astype(np.float32),
             "y": rng.integers(0, CLASSES, BATCH).astype(np.int32)} for _ in range(steps)]


def adamw():
    return optax.adamw(1e-2)


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x), tree)


@functools.cache
def single_device(model: str):
    """Plain jitted AdamW steps on the Stages as the loss, threading the model's
    non-parameter state, no jaxpar: losses, parameters, variables (keys as their data)."""
    with jax.default_device(jax.devices()[0]), nnx.use_eager_sharding(False):
        graphdef, params, rest = nnx.split(MODELS[model](nnx.Rngs(jax.random.key(0))),
                                           nnx.Param, ...)
        params, rest = params.to_pure_dict(), rest.to_pure_dict()
        opt_state = adamw().init(params)

        @jax.jit
        def step(params, rest, opt_state, batch):
            def loss(p):
                model = nnx.merge(graphdef, p, rest)
                return STAGES(model, batch), nnx.state(model, nnx.Not(nnx.Param)).to_pure_dict()

            (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = adamw().update(grads, opt_state, params)
            return optax.apply_updates(params, updates), rest, opt_state, value

        losses = []
        for batch in batches():
            params, rest, opt_state, value = step(params, rest, opt_state, batch)
            losses.append(float(value))
    return losses, _host(params), _host(rest)


def run(par, data, state=None):
    state = par.init(jax.random.key(0)) if state is None else state
    losses = []
    for batch in data:
        state, metrics = par.step(state, par.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    return state, losses


def assert_same(par, state, losses, want):
    """Losses and parameters as one device's (`oracle.assert_same_run`, AdamW); variables too:
    RNG keys and counts exactly, statistics within RTOL."""
    want_losses, want_params, want_rest = want
    assert_same_run((losses, _host(par.params_of(state))), (want_losses, want_params),
                    elementwise=False)

    def same(got, expected):
        if np.issubdtype(expected.dtype, np.floating):
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
        else:
            np.testing.assert_array_equal(got, expected)

    jax.tree.map(same, _host(par.variables_of(state)), want_rest)


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
    state, losses = run(par, batches())
    assert_same(par, state, losses, single_device(CASES[case][0]))


@pytest.mark.parametrize("case", ["spmd-gpipe-norm-m1", "mpmd-1f1b-norm-m1"])
def test_variables_are_checkpointed_and_restored(case, tmp_path):
    par = pipelined(case)
    data = batches()
    state, first = run(par, data[:2])
    ckpt = par.checkpointer(tmp_path, save_every=1)
    ckpt.save(2, state, force=True)
    ckpt.close()
    restored = par.checkpointer(tmp_path, save_every=1).restore()
    jax.tree.map(lambda x, want: x.sharding.is_equivalent_to(want.sharding, x.ndim) or
                 pytest.fail(f"restored {x.sharding}, the step's layout is {want.sharding}"),
                 restored, par.abstract_state)
    state, last = run(par, data[2:], restored)
    assert_same(par, state, first + last, single_device("norm"))


@pytest.mark.parametrize("form", ["spmd", "mpmd"])
def test_batch_statistics_refuse_microbatches_under_a_pipeline(form, compiles):
    plan = jaxpar.named_plan("pp2+dp4", 8, microbatches=4, remat="dots",
                             pipeline=Pipeline("1f1b", form=form))
    with pytest.raises(jaxpar.PlanError, match=r"blocks/norm/mean.*microbatches=4.*"
                                               r"microbatches=1, which the gpipe and 1f1b"):
        jaxpar.parallelize(MODELS["norm"], adamw(), STAGES, plan, batches()[0])
    assert not compiles
