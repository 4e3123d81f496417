"""A run checkpointed and resumed equals the uninterrupted run, in every form: the flat
step, the SPMD pipeline (stack stored in chunks) and the MPMD pipeline (one state per
chunk, each on its stage). The resumed state is read back in the step's own layout."""

import jax
import numpy as np
import optax
import pytest

import jaxpar
from jaxpar.models import gpt
from jaxpar.plan import Pipeline

from oracle import token_batches

LAYERS, EMBED, LENGTH, VOCAB, BATCH = 4, 32, 8, 64, 16
MODEL = gpt.build("tiny", layers=LAYERS, embed=EMBED, heads=4, length=LENGTH, vocab=VOCAB)
BATCHES = token_batches(BATCH, LENGTH, steps=4, vocab=VOCAB)

FORMS = {
    "flat": ("dp2+fsdp2+tp2", None, {}),
    "spmd": ("pp2+dp2+tp2", Pipeline("1f1b", form="spmd"), {"remat": "dots"}),
    "mpmd": ("pp2+dp4", Pipeline("1f1b", form="mpmd"), {"zero": 1}),
}


def _steps(par, state, batches):
    losses = []
    for batch in batches:
        state, metrics = par.step(state, par.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    return state, losses


def _host(par, state):
    return jax.tree.map(np.asarray, par.params_of(state))


@pytest.mark.parametrize("form", FORMS)
def test_resumed_run_equals_uninterrupted(form, tmp_path):
    spec, pipeline, options = FORMS[form]
    plan = jaxpar.named_plan(spec, 8, microbatches=4 if pipeline else 1, pipeline=pipeline,
                             **options)
    loss = gpt.lm_stages if pipeline else gpt.lm_loss
    par = jaxpar.parallelize(MODEL, optax.adamw(1e-2), loss, plan, BATCHES[0])

    whole, whole_losses = _steps(par, par.init(jax.random.key(0)), BATCHES)

    ckpt = par.checkpointer(tmp_path, save_every=2)
    assert ckpt.restore() is None
    state, first_losses = _steps(par, par.init(jax.random.key(0)), BATCHES[:2])
    assert ckpt.save(par.steps_done(state), state)
    ckpt.close()
    del state

    again = par.checkpointer(tmp_path, save_every=2)  # as a new process would
    restored = again.restore()
    again.close()
    assert par.steps_done(restored) == 2
    jax.tree.map(lambda x, want: (x.sharding == want.sharding) or pytest.fail(
        f"restored {x.sharding}, the step's layout is {want.sharding}"),
        restored, par.abstract_state)
    resumed, later_losses = _steps(par, restored, BATCHES[2:])

    assert par.steps_done(resumed) == par.steps_done(whole) == 4
    np.testing.assert_allclose(first_losses + later_losses, whole_losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 _host(par, resumed), _host(par, whole))
