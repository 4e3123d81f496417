"""auto_parallelize: planned plans run, match the single-device program, and their
predictions agree with the compiler; planning is fast; an impossible budget says what fits."""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpar
from jaxpar.hlo import collective_bytes_per_step
from jaxpar.models.gpt import Block, build, lm_loss
from jaxpar.models.presets import GPTConfig
from jaxpar.plan import REMAT, PlanError
from jaxpar.planners.cluster import a100_80gb
from jaxpar.planners.cost import Options, predict
from jaxpar.planners.sharding.search import plan_sharding
from jaxpar.tracing.graph import trace_graph

from oracle import assert_same_run, parallel_run, single_device_run, token_batches

GiB = 2**30


@pytest.fixture(scope="module")
def cluster(calibration_cache):
    return jaxpar.calibrate(cache_dir=calibration_cache)


def assert_matches_single_device(par, model_fn, loss_fn, optimizer, batches):
    want = single_device_run(model_fn, optimizer, loss_fn, batches)
    assert_same_run(parallel_run(par, batches), want, elementwise=False)


# ---------------------------------------------------------------- models jaxpar never saw
class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, d=64, hidden=256, classes=16):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(d, hidden, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                             bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)),
                             rngs=rngs)
        self.down = nnx.Linear(hidden, classes, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, ("mlp", "vocab")),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("vocab",)))

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


class ViT(nnx.Module):
    """Patches of 4x4 pixels, two transformer blocks (not stacked), mean pool, classifier."""

    def __init__(self, rngs: nnx.Rngs, embed=64, classes=16):
        cfg = GPTConfig(vocab=classes, length=16, embed=embed, heads=8, layers=2)
        init = nnx.initializers.lecun_normal()
        self.patch = nnx.Linear(48, embed, rngs=rngs,
                                kernel_init=nnx.with_partitioning(init, (None, "embed")),
                                bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)))
        self.block1, self.block2 = Block(cfg, rngs), Block(cfg, rngs)
        self.head = nnx.Linear(embed, classes, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, ("embed", "vocab")),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("vocab",)))

    def __call__(self, images):  # (batch, 16, 16, 3)
        b = images.shape[0]
        x = images.reshape(b, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, 48)
        x = jaxpar.constrain(self.patch(x), ("batch", "length", "embed"))
        return self.head(self.block2(self.block1(x)).mean(axis=1))


def classify_loss(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def classification_batches(shape, batch=16, steps=3, classes=16):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(batch, *shape)).astype(np.float32),
             "y": rng.integers(0, classes, (batch,)).astype(np.int32)} for _ in range(steps)]


@pytest.mark.parametrize("model_fn, loss_fn, batches", [
    (MLP, classify_loss, classification_batches((64,))),
    (ViT, classify_loss, classification_batches((16, 16, 3))),
    (build("tiny"), lm_loss, token_batches()),
], ids=["mlp", "vit", "gpt-tiny"])
def test_planned_models_match_single_device(model_fn, loss_fn, batches, cluster):
    optimizer = optax.adamw(1e-3)
    par = jaxpar.auto_parallelize(model_fn, optimizer, loss_fn, batches[0], cluster=cluster)
    assert par.plan.predicted is not None and par.plan.alternatives
    assert_matches_single_device(par, model_fn, loss_fn, optimizer, batches)


@pytest.mark.parametrize("force", ["sharding", "remat"])
def test_tight_budgets_are_met_and_still_match(force, cluster):
    model_fn, batches = build("tiny"), token_batches(batch=16, length=64)
    # Adam's eps above the smallest gradients (final_norm/bias has one of 2.5e-8): at the
    # default 1e-8, Adam turns their fp32 summation-order noise into 1e-4 tensor differences
    optimizer = optax.adamw(1e-3, eps=1e-6)
    graph = trace_graph(model_fn, lm_loss, batches[0])
    options = Options(optimizer_slots=2)
    free = plan_sharding(graph, cluster, options=options)
    if force == "sharding":  # below every plan that keeps each parameter whole on a device
        whole = min(predict(graph, jaxpar.named_plan("dp8", 8, remat=r, zero=z).bind(
            graph.params), cluster, options).total_bytes for r in REMAT for z in (0, 1))
        budget = whole - free.predicted.memory_bytes["params"] / 8
    else:
        budget = 0.6 * free.predicted.total_bytes
    par = jaxpar.auto_parallelize(model_fn, optimizer, lm_loss, batches[0], cluster=cluster,
                                  memory_budget=budget, max_microbatches=1)
    plan = par.plan
    assert plan.predicted.total_bytes <= budget < free.predicted.total_bytes
    if force == "sharding":
        assert plan.mesh_shape["fsdp"] * plan.mesh_shape["tensor"] > 1
    else:
        assert plan.remat != "none"
    assert_matches_single_device(par, model_fn, lm_loss, optimizer, batches)


@pytest.fixture(scope="module")
def small_gpt(cluster):
    """`compile(spec)`: GPT small's step under the named plan, compiled once per plan, with
    the cost model's prediction for it (fsdp8 with remat, the others without; a spec may
    name a `grad_reduce` after a space)."""
    model_fn, batch = build("small"), token_batches(batch=16, length=64, steps=1)[0]
    graph = trace_graph(model_fn, lm_loss, batch)

    @functools.cache
    def compile(spec):
        name, _, reduce = spec.partition(" ")
        plan = jaxpar.named_plan(name, 8, remat=name == "fsdp8",
                                 grad_reduce=reduce or "reduce-scatter")
        par = jaxpar.parallelize(model_fn, optax.adamw(1e-3), lm_loss, plan, batch)
        return predict(graph, par.plan, cluster), par.lower(batch).compile()

    return compile


@pytest.mark.parametrize("spec", ["dp8", "fsdp8", "tp8", "dp2+fsdp2+tp2"])
def test_predicted_memory_agrees_with_the_compiler(spec, small_gpt):
    predicted, compiled = small_gpt(spec)
    memory = compiled.memory_analysis()
    pm = predicted.memory_bytes
    # parameters + optimizer state (+ the batch shard) are the step's arguments
    assert pm["params"] + pm["optimizer"] + pm["batch"] == pytest.approx(
        memory.argument_size_in_bytes, rel=0.05)
    assert predicted.total_bytes == pytest.approx(
        memory.argument_size_in_bytes + memory.temp_size_in_bytes, rel=0.25)


# The cost model leaves out the embedding lookup's all-reduce over a vocab-split table (3.9 %
# of tp8's all-reduce bytes) and the loss's reductions over `vocab` (scalars and rows).
COLLECTIVE_BYTES_TOLERANCE = 0.10

@pytest.mark.parametrize("spec", ["dp8", "fsdp8", "tp8", "dp2+fsdp2+tp2",
                                  "dp2+fsdp2+tp2 all-reduce"])
def test_predicted_collective_bytes_per_kind_agree_with_the_compiler(spec, small_gpt):
    predicted, compiled = small_gpt(spec)
    emitted = collective_bytes_per_step(compiled.as_text(), min_bytes=64)
    expected = {kind: nbytes for kind, nbytes in predicted.collective_bytes.items() if nbytes}
    assert set(emitted) == set(expected)
    for kind, nbytes in emitted.items():
        assert expected[kind] == pytest.approx(nbytes, rel=COLLECTIVE_BYTES_TOLERANCE), kind


def test_gpt3_175b_on_1024_and_4096_a100s_plans_in_seconds():
    batch = {k: jax.ShapeDtypeStruct((1536, 2048), jnp.int32) for k in ("inputs", "targets")}
    graph = trace_graph(build("gpt3-175b"), lm_loss, batch)
    for nodes in (128, 512):
        start = time.process_time()
        plan = plan_sharding(graph, a100_80gb(nodes), options=Options(efficiency=0.5))
        assert time.process_time() - start < 10
        assert plan.num_devices == nodes * 8
        assert plan.predicted.total_bytes <= 80e9


def test_impossible_budget_fails_before_compiling(cluster):
    batch = token_batches(steps=1)[0]
    with pytest.raises(PlanError, match=r"no plan fits: the smallest needs \d+\.\d+ [KMGT]iB "
                                        r"per device"):
        jaxpar.auto_parallelize(build("tiny"), optax.adamw(1e-3), lm_loss, batch,
                                cluster=cluster, memory_budget=1000)
