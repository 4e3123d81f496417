"""A loss returning (loss, aux): aux averaged over the batch like the loss and returned in
the step's metrics, equal to the single-device values; any other non-scalar loss is refused
before anything compiles."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpar
from jaxpar.models.gpt import build, lm_loss, lm_stages

from oracle import RTOL, token_batches

MODEL = build("tiny")


def loss_with_aux(model, batch):
    logits = model(batch["inputs"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    accuracy = (logits.argmax(-1) == batch["targets"]).mean()
    z_loss = jax.nn.logsumexp(logits, axis=-1) ** 2
    return loss, {"accuracy": accuracy, "z_loss": z_loss.mean(),
                  "per_position": z_loss.mean(0)}


def single_device(batches):
    """Plain jitted AdamW steps with `has_aux`, no jaxpar: losses, aux and final params."""
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(MODEL(nnx.Rngs(jax.random.key(0))), nnx.Param)
    params = params.to_pure_dict()
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        (loss, aux), grads = jax.value_and_grad(
            lambda p: loss_with_aux(nnx.merge(graphdef, p), batch), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    out = []
    for batch in batches:
        params, opt_state, loss, aux = step(params, opt_state, batch)
        out.append((float(loss), jax.tree.map(np.asarray, aux)))
    return out, params


@pytest.mark.parametrize("spec, options", [
    ("dp8", {}), ("fsdp2+tp4", {"microbatches": 2}), ("dp2+fsdp2+tp2", {"remat": True}),
])
def test_aux_metrics_equal_single_device(spec, options):
    batches = token_batches(16, 32, 3)
    want, want_params = single_device(batches)
    par = jaxpar.parallelize(MODEL, optax.adamw(1e-3), loss_with_aux,
                             jaxpar.named_plan(spec, 8, **options), batches[0])
    state = par.init(jax.random.key(0))
    for batch, (loss, aux) in zip(batches, want):
        state, metrics = par.step(state, par.shard_batch(batch))
        np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=RTOL)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-6),
                     metrics["aux"], aux)
    jax.tree.map(lambda g, w: np.testing.assert_array_less(
        np.linalg.norm(np.asarray(g) - w), RTOL * np.linalg.norm(w) + 1e-12),
        par.params_of(state), want_params)


def test_plain_loss_has_no_aux_metric():
    batches = token_batches(16, 32, 1)
    par = jaxpar.parallelize(MODEL, optax.sgd(0.1), lm_loss, jaxpar.named_plan("dp8", 8),
                             batches[0])
    _, metrics = par.step(par.init(jax.random.key(0)), par.shard_batch(batches[0]))
    assert set(metrics) == {"loss", "grad_norm"}


@pytest.fixture(scope="module")
def cluster():
    return jaxpar.local_cluster()  # reads the devices with a few small programs


def test_non_scalar_loss_refused_before_compiling(cluster, compiles):
    batches = token_batches(16, 32, 1)

    def per_example(model, batch):  # forgot the mean
        logits = model(batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])

    for entry in (jaxpar.parallelize, jaxpar.auto_parallelize):
        args = ((jaxpar.named_plan("dp8", 8), batches[0]) if entry is jaxpar.parallelize
                else (batches[0], cluster))
        with pytest.raises(jaxpar.PlanError, match=r"loss returned float32\[16, 32\]"):
            entry(MODEL, optax.sgd(0.1), per_example, *args)
    assert not compiles


def test_aux_refused_under_a_pipeline(compiles):
    batches = token_batches(16, 32, 1)
    stages = jaxpar.Stages(lm_stages.stack, lm_stages.pre, lm_stages.layer,
                           lambda model, x, batch: (lm_stages.post(model, x, batch), {}))
    plan = jaxpar.named_plan("pp2+dp4", 8, microbatches=2)
    with pytest.raises(jaxpar.PlanError, match="returns \\(loss, aux\\)"):
        jaxpar.parallelize(MODEL, optax.sgd(0.1), stages, plan, batches[0])
    assert not compiles
