"""Grouped-query attention under tensor parallelism: key / value heads fewer than the tensor
degree are replicated over it (`jaxpar.rules.FIT_TO_SIZE`), train like the single-device
program, show in the plan table, and are priced as the compiler runs them; a user rule still
decides, and every other logical name keeps the divisibility error."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpar
from jaxpar.hlo import collective_bytes_per_step
from jaxpar.plan import DEFAULT_RULES, ParamInfo, Plan, PlanError
from jaxpar.planners.cluster import a100_80gb
from jaxpar.planners.cost import predict
from jaxpar.rules import fit
from jaxpar.tracing.graph import trace_graph
from jaxpar.tracing.stages import run_stack

from oracle import parallel_run, single_device_run, token_batches

EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, VOCAB = 64, 8, 2, 8, 128, 2, 256
BATCH, LENGTH, STEPS = 16, 32, 3
KV_PARAMS = ("blocks/attention/key/kernel", "blocks/attention/value/kernel")
RTOL, ATOL = 1e-5, 1e-6  # fp32, SGD: a plan only reorders sums
# the default rules but for kv heads, replicated even where the tensor degree divides them
REPLICATE_KV = tuple((n, () if n == "kv_heads" else a) for n, a in DEFAULT_RULES)


def assert_same_run(got, want):
    """Losses, and every parameter entry by entry, as the single-device run's."""
    np.testing.assert_allclose(got[0], want[0], rtol=RTOL)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL),
                 got[1], want[1])


# --------------------------------------------------------------------- a small GQA model
def _init(axes):
    return nnx.with_partitioning(nnx.initializers.normal(0.02), axes)


class Attention(nnx.Module):
    """8 query heads over 2 key / value heads (groups of 4)."""

    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.Einsum("btd,dhk->bthk", (EMBED, HEADS, HEAD_DIM),
                                kernel_init=_init(("embed", "heads", "kv")), rngs=rngs)
        self.key = nnx.Einsum("btd,dhk->bthk", (EMBED, KV_HEADS, HEAD_DIM),
                              kernel_init=_init(("embed", "kv_heads", "kv")), rngs=rngs)
        self.value = nnx.Einsum("btd,dhk->bthk", (EMBED, KV_HEADS, HEAD_DIM),
                                kernel_init=_init(("embed", "kv_heads", "kv")), rngs=rngs)
        self.out = nnx.Einsum("bthk,hkd->btd", (HEADS, HEAD_DIM, EMBED),
                              kernel_init=_init(("heads", "kv", "embed")), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q = jaxpar.constrain(self.query(x), ("batch", "length", "heads", "kv"))
        k = jaxpar.constrain(self.key(x), ("batch", "length", "kv_heads", "kv"))
        v = jaxpar.constrain(self.value(x), ("batch", "length", "kv_heads", "kv"))
        y = jaxpar.constrain(jaxpar.attention(q, k, v, causal=True),
                             ("batch", "length", "heads", "kv"))
        return jaxpar.constrain(self.out(y), ("batch", "length", "embed"))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(
            EMBED, rngs=rngs,
            scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))
        self.attention = Attention(rngs)
        self.up = nnx.Linear(EMBED, MLP, use_bias=False, kernel_init=_init(("embed", "mlp")),
                             rngs=rngs)
        self.down = nnx.Linear(MLP, EMBED, use_bias=False, kernel_init=_init(("mlp", "embed")),
                               rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm(x))
        h = jaxpar.constrain(jax.nn.gelu(self.up(x)), ("batch", "length", "mlp"))
        return x + jaxpar.constrain(self.down(h), ("batch", "length", "embed"))


class GQA(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, EMBED, embedding_init=_init(("vocab", "embed")),
                               rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(rngs)

        self.blocks = make_blocks(rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jaxpar.constrain(self.embed(tokens), ("batch", "length", "embed"))
        x = run_stack(self.blocks, x, lambda block, x: block(x))
        return jaxpar.constrain(self.embed.attend(x), ("batch", "length", "vocab"))


def lm_loss(model: GQA, batch: dict) -> jax.Array:
    logits = model(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


@pytest.fixture(scope="module")
def batches():
    return token_batches(BATCH, LENGTH, STEPS, VOCAB)


@pytest.fixture(scope="module")
def reference(batches):
    return single_device_run(GQA, optax.sgd(1.0), lm_loss, batches)


@pytest.fixture(scope="module")
def parallelized(batches):
    """`par(spec, rules)`: the SGD step of the GQA model under a named plan, built once."""
    @functools.cache
    def par(spec, rules=DEFAULT_RULES):
        return jaxpar.parallelize(GQA, optax.sgd(1.0), lm_loss,
                                  jaxpar.named_plan(spec, 8, rules=rules), batches[0])

    return par


# ------------------------------------------------------- layouts (pure data, no devices)
KEY = ParamInfo("blocks/attention/key/kernel", (LAYERS, EMBED, KV_HEADS, HEAD_DIM), "float32",
                ("layers", "embed", "kv_heads", "kv"))


@pytest.mark.parametrize("mesh, axes, per_device", [
    ((("tensor", 2),), ("tensor",), 1),  # tp2 divides 2 kv heads: split like the heads
    ((("tensor", 4),), (), 2),  # fewer kv heads than the tensor degree: replicated
    ((("tensor", 8),), (), 2),
])
def test_kv_heads_take_the_mesh_axes_that_divide_them(mesh, axes, per_device):
    plan = Plan(mesh=mesh)
    plan.check_param(KEY)
    assert plan.param_layout(KEY) == ((), (), axes, ())
    assert plan.shard_shape(KEY) == (LAYERS, EMBED, per_device, HEAD_DIM)
    # activations too, given their shape (`constrain` gives it)
    assert plan.layout(("batch", "length", "kv_heads", "kv"), shape=(BATCH, LENGTH, 2, 8)) \
        == ((), (), axes, ())


def test_fit_keeps_the_largest_dividing_sub_tuple():
    sizes = {"data": 2, "fsdp": 4, "tensor": 8}
    assert fit(sizes, ("data", "fsdp", "tensor"), 64) == ("data", "fsdp", "tensor")
    assert fit(sizes, ("data", "fsdp", "tensor"), 8) == ("data", "fsdp")  # 2 x 4, longest
    assert fit(sizes, ("fsdp", "tensor"), 8) == ("tensor",)
    assert fit(sizes, ("data", "tensor"), 6) == ("data",)
    assert fit(sizes, ("tensor",), 2) == ()


def test_other_names_keep_the_divisibility_error():
    plan = Plan(mesh=(("tensor", 8),))
    query = ParamInfo("blocks/attention/query/kernel", (EMBED, 2, HEAD_DIM), "float32",
                      ("embed", "heads", "kv"))
    with pytest.raises(PlanError, match=r"dimension 'heads' has size 2, which mesh axes tensor "
                                        r"\(size 8\) do not divide"):
        plan.check_param(query)


def test_a_user_rule_decides_the_kv_heads_layout():
    assert Plan(mesh=(("tensor", 2),), rules=REPLICATE_KV).param_layout(KEY) == ((),) * 4
    # a group rule for the key projection alone: split its kv heads over fsdp
    over_fsdp = tuple((n, ("fsdp",) if n == "kv_heads" else a) for n, a in DEFAULT_RULES)
    plan = Plan(mesh=(("fsdp", 2), ("tensor", 4)), group_rules=(("/key/", over_fsdp),))
    assert plan.param_layout(KEY) == ((), (), ("fsdp",), ())
    assert plan.layout_note(KEY) == ""


# ------------------------------------------------------------------ the compiled program
@pytest.mark.parametrize("spec", ["tp8", "dp2+tp4"])
def test_gqa_trains_like_the_single_device_program(spec, parallelized, batches, reference):
    par = parallelized(spec)
    assert_same_run(parallel_run(par, batches), reference)


@pytest.mark.parametrize("spec", ["tp8", "dp2+tp4"])
def test_plan_table_shows_the_replicated_kv_projections(spec, parallelized):
    plan = parallelized(spec).plan
    tensor = plan.axis_size("tensor")
    rows = {line.split()[0]: line for line in str(plan).splitlines()[1:]}
    for path in KV_PARAMS:
        assert plan.param_layout(next(p for p in plan.params if p.path == path)) == ((),) * 4
        assert rows[path].split()[1:] == [
            "2x64x2x8", "layers,", "embed,", "kv_heads,", "kv", "-,", "-,", "-,", "-",
            "2x64x2x8", "replicated", "over", "tensor:", "kv_heads", "2", "not", "divisible",
            "by", str(tensor)]
    assert "note" not in str(Plan(mesh=(("tensor", 2),)).bind(plan.params))


@pytest.mark.parametrize("spec, rules", [("tp8", DEFAULT_RULES), ("dp2+tp4", DEFAULT_RULES),
                                         ("dp4+tp2", REPLICATE_KV)])
def test_predicted_collectives_and_memory_agree_with_the_compiler(spec, rules, parallelized,
                                                                  batches):
    """The kv gradients' sum over `tensor` is priced as XLA emits it: an all-reduce of each
    device's kv heads' share (none under tp2: each device's query heads use one kv head),
    then an all-gather of the whole (the only all-gathers of these plans). The all-reduces
    differ by what the cost model leaves out everywhere: the embedding lookup's all-reduce
    and the loss's row reductions."""
    par = parallelized(spec, rules)
    compiled = par.lower(batches[0]).compile()
    emitted = collective_bytes_per_step(compiled.as_text(), min_bytes=64)
    predicted = predict(trace_graph(GQA, lm_loss, batches[0]), par.plan, a100_80gb())
    dp = par.plan.data_parallel_size
    lookup = BATCH * LENGTH * EMBED * 4 // dp
    assert set(emitted) == {"all-reduce", "all-gather"}
    assert predicted.collective_bytes["all-gather"] == emitted["all-gather"]
    assert predicted.collective_bytes["all-reduce"] + lookup == pytest.approx(
        emitted["all-reduce"], rel=0.01)
    # replicated kv weights are whole on every device, and their SGD state is empty
    memory = compiled.memory_analysis()
    assert predicted.memory_bytes["params"] + predicted.memory_bytes["batch"] == pytest.approx(
        memory.argument_size_in_bytes, rel=0.01)


def test_replicating_divisible_kv_heads_by_rule_trains_like_the_single_device_program(
        parallelized, batches, reference):
    """dp4+tp2 divides the 2 kv heads; a user rule replicates them anyway."""
    par = parallelized("dp4+tp2", REPLICATE_KV)
    key = next(p for p in par.plan.params if p.path == KV_PARAMS[0])
    assert par.plan.param_layout(key) == ((), (), (), ())
    assert_same_run(parallel_run(par, batches), reference)
    np.testing.assert_array_equal(par.plan.shard_shape(key), key.shape)
