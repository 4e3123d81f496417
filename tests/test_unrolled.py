"""A model that keeps its blocks in a list (`nnx.List`, each block passed to `jaxpar.layer`)
trains like the single-device program under every flat plan, and the planner prices it as
the stack it equals."""

import optax
import pytest
from flax import nnx

import jaxpar
from jaxpar.models import gpt
from jaxpar.models.presets import preset
from jaxpar.tracing.graph import trace_graph

from oracle import assert_same_run, parallel_run, single_device_run, token_batches

CFG = preset("tiny")


class UnrolledGPT(gpt.GPT):
    """The GPT with its blocks unrolled: a list of modules, one `jaxpar.layer` call each."""

    def __init__(self, cfg, rngs):
        super().__init__(cfg, rngs)
        self.blocks = nnx.List([gpt.Block(cfg, rngs) for _ in range(cfg.layers)])

    def __call__(self, tokens):
        x = self.embed_tokens(tokens)
        for block in self.blocks:
            x = jaxpar.layer(gpt.Block.__call__)(block, x)
        return self.logits(x)


def unrolled(rngs):
    return UnrolledGPT(CFG, rngs)


@pytest.fixture(scope="module")
def batches():
    return token_batches(16, 32, 3)


@pytest.fixture(scope="module")
def reference(batches):
    return single_device_run(unrolled, optax.adamw(1e-3), gpt.lm_loss, batches)


@pytest.mark.parametrize("spec, options", [
    ("dp8", {}), ("fsdp8", {}), ("tp8", {}), ("dp2+fsdp2+tp2", {}),
    ("fsdp4+tp2", {"remat": True}),
])
def test_unrolled_blocks_match_single_device(spec, options, batches, reference):
    plan = jaxpar.named_plan(spec, 8, **options)
    par = jaxpar.parallelize(unrolled, optax.adamw(1e-3), gpt.lm_loss, plan, batches[0])
    assert_same_run(parallel_run(par, batches), reference, elementwise=False)


def test_unrolled_graph_is_the_stack(batches):
    """The planner sees the unrolled blocks as the stack they equal: same repeat, FLOPs,
    matmuls, parameter bytes and saved activations per layer."""
    loose = trace_graph(unrolled, gpt.lm_loss, batches[0])
    stacked = trace_graph(gpt.build(CFG), gpt.lm_loss, batches[0])
    for a, b in zip(loose.groups, stacked.groups, strict=True):
        assert (a.name, a.repeat, a.flops_fwd, a.param_bytes) == (
            b.name, b.repeat, b.flops_fwd, b.param_bytes)
        assert [(m.flops, m.out_bytes, m.in_bytes, m.contracting, m.free) for m in a.matmuls] \
            == [(m.flops, m.out_bytes, m.in_bytes, m.contracting, m.free) for m in b.matmuls]
        for kind in ("saved", "saved_dots", "saved_remat"):
            assert sum(t.nbytes for t in getattr(a, kind)) == pytest.approx(
                sum(t.nbytes for t in getattr(b, kind)))


def test_auto_parallelize_unrolled_matches_single_device(batches, reference):
    """auto_parallelize plans the unrolled model as the stacked one (their graphs are equal)
    and its plan trains like the single-device program."""
    def auto(model_fn):
        return jaxpar.auto_parallelize(model_fn, optax.adamw(1e-3), gpt.lm_loss, batches[0],
                                       cluster=jaxpar.local_cluster(), memory_budget=2**20)
    par = auto(unrolled)
    stacked = auto(gpt.build(CFG)).plan
    assert (par.plan.mesh, par.plan.remat, par.plan.zero, par.plan.microbatches) == (
        stacked.mesh, stacked.remat, stacked.zero, stacked.microbatches)
    assert_same_run(parallel_run(par, batches), reference, elementwise=False)
