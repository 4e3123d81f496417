"""The MPMD pipeline runtime equals the single-device program and stashes what its schedule
says. Cases cover every schedule, p in {2, 4, 8}, v in {1, 2} and m in {4, 8}, with dp,
fsdp (its gradients all-reduced: `grad_reduce`), tp or nothing inside the stages, plus remat,
ZeRO-1 and an uneven cut; not the cross
product, since every chunk's programs compile separately (each case compiles once and
serves every test)."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpar
from jaxpar.emit.parallelized import Parallelized
from jaxpar.models import gpt
from jaxpar.plan import DEFAULT_RULES, Pipeline, PlanError
from jaxpar.planners.schedules.simulator import peak_stash
from jaxpar.runtime.driver import updates_chunks_alone
from jaxpar.tracing.stages import Pieces

from oracle import (
    ATOL,
    RTOL,
    assert_same_run,
    parallel_run,
    single_device_run,
    token_batches,
)

BATCH, LENGTH, VOCAB, EMBED, LAYERS = 16, 8, 64, 32, 8
MODEL = gpt.build("tiny", layers=LAYERS, embed=EMBED, heads=4, length=LENGTH, vocab=VOCAB)
BATCHES = token_batches(BATCH, LENGTH, steps=3, vocab=VOCAB)

# name: (plan, pipeline, microbatches, other plan options)
CASES = {
    "gpipe-pp2-dp4-m4": ("pp2+dp4", Pipeline("gpipe"), 4, {"zero": 1}),
    "1f1b-pp2-dp4-m4-remat": ("pp2+dp4", Pipeline("1f1b"), 4, {"zero": 1, "remat": True}),
    "1f1b-pp8-m4": ("pp8", Pipeline("1f1b"), 4, {}),
    "interleaved-pp2-v2-tp4-m4": ("pp2+tp4", Pipeline("interleaved_1f1b", virtual=2), 4, {}),
    "zb-pp4-fsdp2-m8-cut1322": ("pp4+fsdp2", Pipeline("zero_bubble_h1", cut=(1, 3, 2, 2)), 8,
                                {"grad_reduce": "all-reduce"}),
}


def adamw():
    return optax.adamw(1e-3)


@functools.cache
def pipelined(case: str) -> Parallelized:
    """One runtime per case, shared by the tests (its programs compile once)."""
    spec, pipeline, m, options = CASES[case]
    plan = jaxpar.named_plan(spec, 8, microbatches=m, pipeline=pipeline, **options)
    return jaxpar.parallelize(MODEL, adamw(), gpt.lm_stages, plan, BATCHES[0])


@pytest.fixture(scope="module")
def reference():
    """Parameters, loss and gradient of the unpipelined loss on one device."""
    with jax.default_device(jax.devices()[0]), nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(MODEL(nnx.Rngs(jax.random.key(0))), nnx.Param)
        params = jax.tree.map(np.asarray, params.to_pure_dict())
        loss, grads = jax.jit(jax.value_and_grad(
            lambda p: gpt.lm_stages(nnx.merge(graphdef, p), BATCHES[0])))(params)
    return params, float(loss), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match_single_device(case, reference):
    params, want_loss, want_grads = reference
    loss, grads = pipelined(case).loss_and_grads(params, BATCHES[0])
    np.testing.assert_allclose(float(loss), want_loss, rtol=RTOL)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL),
                 grads, want_grads)


def test_adamw_training_matches_single_device():
    """Three AdamW steps with ZeRO-1 inside the stages: the embedding goes to the last stage
    each step and its gradient comes back."""
    par = pipelined("gpipe-pp2-dp4-m4")
    state = par.init(jax.random.key(0))
    losses = []
    for batch in BATCHES:
        state, metrics = par.step(state, par.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    want = single_device_run(MODEL, adamw(), gpt.lm_stages, BATCHES)
    assert_same_run((np.array(losses), par.params_of(state)), want, elementwise=False)


def test_stash_follows_the_schedule():
    """Each rank holds as many (microbatch, chunk) residual sets as the simulator counts:
    GPipe m, 1F1B p on rank 0. With remat a set is little more than the chunk's layer inputs:
    no weight is copied into it. (The two plans differ only in schedule and remat, which
    the train state does not depend on, so one init serves both.)"""
    state = pipelined("gpipe-pp2-dp4-m4").init(jax.random.key(0))
    for case in ("gpipe-pp2-dp4-m4", "1f1b-pp2-dp4-m4-remat"):
        par = pipelined(case)
        state, metrics = par.step(state, par.shard_batch(BATCHES[0]))
        s, sets = par.schedule, metrics["peak_stash"]
        np.testing.assert_array_equal(sets, [peak_stash(ops, s.splits_backward) for ops in s.ops])
        assert list(sets) == ([s.m] * s.p if s.name == "gpipe" else [s.p, 1])
        if par.plan.remat == "full":
            layers, activation = LAYERS // s.p, BATCH // s.m * LENGTH * EMBED * 4
            per_set = metrics["peak_stash_bytes"][0] / sets[0]
            assert layers * activation <= per_set < (layers + 1) * activation




LAYERS_OVER_DATA = tuple((name, ("data",) if name == "layers" else axes)
                         for name, axes in DEFAULT_RULES)


@pytest.mark.parametrize("model, loss, spec, options, message", [
    (MODEL, gpt.lm_loss, "pp2+dp4", {}, "needs the loss as a jaxpar.Stages"),
    (gpt.build("tiny", layers=6), gpt.lm_stages, "pp4+dp2", {},
     "6 layers do not divide into 4 stages"),
    (MODEL, gpt.lm_stages, "pp4+dp2",
     {"pipeline": Pipeline("interleaved_1f1b", virtual=2), "microbatches": 6},
     "m=6, p=4: use m=4 or m=8"),
    (MODEL, gpt.lm_stages, "pp2+dp2+tp2", {"pipeline": Pipeline(cut=(1, 7)),
                                           "rules": LAYERS_OVER_DATA},
     r"split over data \(size 2\) inside each stage, which does not divide the chunks of "
     r"\[1, 7\] layers"),
], ids=["plain-loss", "layers-6-on-4-stages", "interleaved-m6-p4", "chunk-of-split-layers"])
def test_bad_input_is_a_plan_error_before_compiling(model, loss, spec, options, message,
                                                    compiles):
    plan = jaxpar.named_plan(spec, 8, **{"microbatches": 4, **options})
    with pytest.raises(PlanError, match=message):
        jaxpar.parallelize(model, adamw(), loss, plan, token_batches(48, LENGTH, 1)[0])
    assert not compiles


def test_an_update_coupling_the_chunks_is_refused_by_mpmd_and_trains_in_spmd():
    """clip_by_global_norm needs the whole model's gradient norm, which no chunk sees alone:
    the MPMD form refuses it (the check runs the optimizer eagerly on a few small arrays,
    before any of the chunks' programs); the SPMD form trains like one device."""
    # clipped SGD: a coupled update whose parameters compare entry by entry (under Adam,
    # near-zero layer-norm bias gradients turn fp32 summation-order noise into 1.8e-4)
    clipped = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(0.5))
    pieces = Pieces.of(MODEL, gpt.lm_stages)
    assert updates_chunks_alone(optax.adamw(1e-3), pieces)
    assert not updates_chunks_alone(clipped, pieces)
    assert not updates_chunks_alone(optax.lamb(1e-3), pieces)  # a trust ratio per stack
    plan = jaxpar.named_plan("pp2+dp4", 8, microbatches=4, pipeline=Pipeline("1f1b"))
    with pytest.raises(PlanError, match="couples parameters across pipeline chunks.*spmd"):
        jaxpar.parallelize(MODEL, clipped, gpt.lm_stages, plan, BATCHES[0])
    spmd = dataclasses.replace(plan, remat="dots", pipeline=Pipeline("1f1b", form="spmd"))
    par = jaxpar.parallelize(MODEL, clipped, gpt.lm_stages, spmd, BATCHES[0])
    want = single_device_run(MODEL, clipped, gpt.lm_loss, BATCHES)
    assert_same_run(parallel_run(par, BATCHES), want, elementwise=True)
