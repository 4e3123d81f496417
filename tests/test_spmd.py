"""The SPMD pipeline program: gradients and training equal the single-device run, its tick
loop is the schedule's length, and 1F1B needs less memory than GPipe."""

import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpar
from jaxpar.models import gpt
from jaxpar.plan import Pipeline, PlanError
from jaxpar.planners.schedules.ticks import tick_table
from jaxpar.tracing.params import abstract_params

from oracle import ATOL, RTOL, assert_same_run, single_device_run, token_batches

VOCAB, LENGTH, BATCH = 64, 16, 16
MODEL = gpt.build("tiny", layers=8, embed=32, heads=4, length=LENGTH, vocab=VOCAB)


def pipelined(spec, schedule, v, m, model_fn=MODEL, batch_size=BATCH, length=LENGTH,
              optimizer=None):
    plan = jaxpar.named_plan(spec, 8, microbatches=m, remat="dots",
                             pipeline=Pipeline(schedule, virtual=v, form="spmd"))
    batch = token_batches(batch_size, length, steps=1, vocab=VOCAB)[0]
    par = jaxpar.parallelize(model_fn, optimizer or optax.sgd(0.1), gpt.lm_stages, plan, batch)
    return par, batch


@pytest.fixture(scope="module")
def reference():
    """Random parameters, a batch, and the single-device loss and gradient there."""
    batch = token_batches(BATCH, LENGTH, steps=1, vocab=VOCAB)[0]
    graphdef, shapes, _ = abstract_params(MODEL)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
    with jax.default_device(jax.devices()[0]):
        loss_and_grads = jax.value_and_grad(lambda p: gpt.lm_loss(nnx.merge(graphdef, p), batch))
        return params, batch, jax.jit(loss_and_grads)(params)


@pytest.mark.parametrize("spec, schedule, v, m", [
    ("pp2+dp4", "1f1b", 1, 4),
    ("pp2+tp4", "interleaved_1f1b", 2, 8),
    ("pp4+tp2", "gpipe", 1, 8),
    ("pp4+dp2", "interleaved_1f1b", 2, 4),
    ("pp8", "1f1b", 1, 4),
    ("pp2+tp4", "zero_bubble_h1", 1, 4),
])  # with the training run below (pp2+dp2+tp2): every p, v, m and intra-stage split
def test_loss_and_gradients_equal_single_device(spec, schedule, v, m, reference):
    params, batch, (want_loss, want_grads) = reference
    par, _ = pipelined(spec, schedule, v, m)
    loss, grads = par.loss_and_grads(params, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL),
                 grads, want_grads)


def test_training_equals_single_device_run():
    optimizer = optax.adamw(1e-2)
    par, _ = pipelined("pp2+dp2+tp2", "interleaved_1f1b", 2, 4, optimizer=optimizer)
    batches = token_batches(BATCH, LENGTH, steps=3, vocab=VOCAB)
    state, losses = par.init(jax.random.key(0)), []
    for batch in batches:
        state, metrics = par.step(state, par.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    got = np.array(losses), jax.tree.map(np.asarray, par.params_of(state))
    want = single_device_run(MODEL, optimizer, gpt.lm_loss, batches)
    assert_same_run(got, want, elementwise=False)


def tick_loops(hlo: str) -> list[int]:
    """Trip counts of the entry computation's while loops (the layer scans nest inside)."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}\n")]
    return [int(n) for n in re.findall(r" while\(.*\"known_trip_count\":\{\"n\":\"(\d+)\"", entry)]


@pytest.fixture(scope="module")
def compiled():
    """GPipe and 1F1B train steps, p = 4, m = 8, on a model whose activations outweigh its
    weights (one layer per chunk), compiled; with the activation size of a microbatch."""
    model_fn = gpt.build("tiny", layers=4, embed=64, heads=1, mlp=64, length=32, vocab=VOCAB)
    programs = {}
    for schedule in ("gpipe", "1f1b"):
        par, batch = pipelined("pp4+dp2", schedule, 1, 8, model_fn, batch_size=128, length=32)
        state = jax.eval_shape(par.init, jax.random.key(0))
        programs[schedule] = par, par.step.lower(state, par.shard_batch(batch)).compile()
    return programs, (128 // 8 // 2) * 32 * 64 * 4


def test_tick_loop_runs_the_schedule_length(compiled):
    programs, _ = compiled
    for par, program in programs.values():
        length = tick_table(par.schedule).length
        assert tick_loops(program.as_text()) == [length] == [2 * (8 + 4 - 1)]


def test_1f1b_needs_less_temp_memory_than_gpipe(compiled):
    """1F1B stashes p = 4 microbatches' residuals, GPipe all m = 8: the compiled temp
    memory differs by at least 4 activations (a residual set holds several)."""
    programs, activation_bytes = compiled
    temp = {name: program.memory_analysis().temp_size_in_bytes
            for name, (_, program) in programs.items()}
    slots = {name: tick_table(par.schedule).slots["r"] for name, (par, _) in programs.items()}
    assert slots == {"gpipe": 8, "1f1b": 4}
    assert temp["gpipe"] - temp["1f1b"] >= 4 * activation_bytes, temp


@pytest.mark.parametrize("pipeline, message", [
    (Pipeline("1f1b", form="spmd", cut=(3, 5)), "needs equal chunks"),
    (Pipeline("1f1b", form="spmd"), "remat='none': use remat='dots' or 'full'"),
])
def test_unsupported_pipelines_are_refused(pipeline, message):
    remat = "none" if "remat" in message else "dots"
    plan = jaxpar.named_plan("pp2+dp4", 8, microbatches=4, pipeline=pipeline, remat=remat)
    batch = token_batches(BATCH, LENGTH, steps=1, vocab=VOCAB)[0]
    with pytest.raises(PlanError, match=message):
        jaxpar.parallelize(MODEL, optax.sgd(0.1), gpt.lm_stages, plan, batch)
