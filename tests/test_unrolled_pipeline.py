"""A model that keeps its blocks in a list (`nnx.List`, each block passed to `jaxpar.layer`)
runs under pipelined plans in both forms like the single-device program, stored as the
stack it equals (the plan's parameter table says so) and handed back in its own structure;
the stage planner picks for it what it picks for the stacked model; a list of layers that
differ is refused before anything compiles."""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpar
from jaxpar.models import llama
from jaxpar.models.presets import LlamaConfig
from jaxpar.plan import Pipeline, PlanError
from jaxpar.planners.cluster import Cluster

from oracle import ATOL, RTOL, assert_same_run, parallel_run, single_device_run, token_batches

CFG = LlamaConfig(vocab=128, length=16, embed=32, heads=4, kv_heads=2, layers=4, mlp=64,
                  blocks="unrolled")
UNROLLED = llama.build(CFG)
STACKED = llama.build(dataclasses.replace(CFG, blocks="stacked"))
BATCHES = token_batches(16, 16, 3, vocab=128)
# 4 nodes of 2 devices with a slow network between them: the stage planner pipelines
SLOW_NETWORK = Cluster("test", num_nodes=4, devices_per_node=2, peak_flops=1e10,
                       memory_bytes=2**30, intra_node_bandwidth=1e10, intra_node_latency=1e-5,
                       inter_node_bandwidth=1e5, inter_node_latency=1e-3)


def adamw():
    return optax.adamw(1e-3)


@pytest.fixture(scope="module")
def reference():
    """The unrolled model's single-device run, with the Stages as its loss."""
    return single_device_run(UNROLLED, adamw(), llama.lm_stages, BATCHES)


def pipelined(model_fn, spec, pipeline, **options):
    plan = jaxpar.named_plan(spec, 8, microbatches=4, pipeline=pipeline, **options)
    return jaxpar.parallelize(model_fn, adamw(), llama.lm_stages, plan, BATCHES[0])


# name: (plan, pipeline, other plan options)
CASES = {
    "mpmd-zb-fsdp-tp": ("pp2+fsdp2+tp2", Pipeline("zero_bubble_h1", form="mpmd"),
                        {"remat": "full"}),
    "spmd-interleaved-fsdp": ("pp2+fsdp4", Pipeline("interleaved_1f1b", virtual=2, form="spmd"),
                              {"remat": "dots"}),
}


@functools.cache
def unrolled_case(case: str):
    """The unrolled model under one case's plan, shared by the tests (compiled once)."""
    spec, pipeline, options = CASES[case]
    return pipelined(UNROLLED, spec, pipeline, **options)


@pytest.mark.parametrize("case", CASES)
def test_unrolled_blocks_pipeline_like_single_device(case, reference):
    par = unrolled_case(case)
    # stored as the stack: one `layers`-first entry per parameter of a block, over the stage
    stacked = [p for p in par.plan.params if p.path.startswith("blocks/")]
    assert stacked and all(p.logical_axes[0] == "layers" and p.shape[0] == CFG.layers
                           and not p.path.split("/")[1].isdigit() for p in stacked)
    got = parallel_run(par, BATCHES)
    assert list(got[1]["blocks"]) == list(range(CFG.layers))  # the model's own structure
    assert_same_run(got, reference, elementwise=False)


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_come_in_the_models_structure(case):
    """`loss_and_grads` takes and returns the model's own structure (the list's entries),
    equal to `jax.value_and_grad` on one device."""
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(UNROLLED(nnx.Rngs(0)), nnx.Param)
    params, batch = params.to_pure_dict(), BATCHES[0]
    with jax.default_device(jax.devices()[0]):
        want_loss, want_grads = jax.jit(jax.value_and_grad(
            lambda p: llama.lm_loss(nnx.merge(graphdef, p), batch)))(params)
    loss, grads = unrolled_case(case).loss_and_grads(params, batch)
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL),
                 grads, want_grads)


def test_unrolled_blocks_stash_what_the_stack_stashes():
    """Each chunk runs its layers in a scan over the stacked weights, so the residuals each
    F stashes are the stacked model's (activations, no copies of the layers' weights)."""
    def stash(model_fn):
        par = pipelined(model_fn, "pp2+fsdp4", Pipeline("1f1b", form="mpmd"))
        _, metrics = par.step(par.init(jax.random.key(0)), par.shard_batch(BATCHES[0]))
        return metrics["peak_stash"].tolist(), metrics["peak_stash_bytes"].tolist()

    assert stash(UNROLLED) == stash(STACKED)


def test_auto_parallelize_pipelines_unrolled_blocks_as_the_stack(reference):
    """The stage planner sees the unrolled blocks as the stack they equal, so it picks the
    same pipeline for both models; the pick trains like one device."""
    def auto(model_fn):
        return jaxpar.auto_parallelize(model_fn, adamw(), llama.lm_stages, BATCHES[0],
                                       cluster=SLOW_NETWORK, pipeline=True)

    par, stacked = auto(UNROLLED), auto(STACKED).plan
    plan = par.plan
    assert plan.pipeline is not None and plan.stages > 1
    assert (plan.mesh, plan.pipeline, plan.remat, plan.microbatches, plan.zero) == (
        stacked.mesh, stacked.pipeline, stacked.remat, stacked.microbatches, stacked.zero)
    assert plan.predicted.step_s == stacked.predicted.step_s
    assert_same_run(parallel_run(par, BATCHES), reference, elementwise=False)


class Uneven(llama.Llama):
    """Llama whose second block differs from the others: in a parameter's shape
    (`mlp`), or only in an attribute (`norm_eps`)."""

    def __init__(self, cfg, rngs, change):
        super().__init__(cfg, rngs)
        self.blocks[1] = llama.Block(dataclasses.replace(cfg, **change), rngs)


@pytest.mark.parametrize("change, message", [
    ({"mlp": 32}, r"'blocks' is a list of 4 layers that differ: blocks/1/mlp/down/kernel has "
                  r"shape \(32, 32\).*blocks/0/mlp/down/kernel has shape \(64, 32\)"),
    ({"norm_eps": 1e-3}, r"blocks/1 \(Block\) has other submodules or attributes than "
                         r"blocks/0"),
], ids=["shape", "attribute"])
def test_a_list_of_different_layers_is_refused_before_compiling(change, message, compiles):
    def model_fn(rngs: nnx.Rngs) -> Uneven:
        return Uneven(CFG, rngs, change)

    for form in ("mpmd", "spmd"):
        with pytest.raises(PlanError, match=message):
            pipelined(model_fn, "pp2+dp4", Pipeline("1f1b", form=form), remat="dots")
    assert not compiles
