"""Bad input gets a clear error naming the value, the limit and the fix, before any compile."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpar
from jaxpar.models.gpt import build, lm_loss
from jaxpar.plan import PlanError


def batch(size: int = 16, length: int = 32):
    tokens = np.zeros((size, length), np.int32)
    return {"inputs": tokens, "targets": tokens}


def parallelize(model_fn, plan, example):
    return jaxpar.parallelize(model_fn, optax.adamw(1e-3), lm_loss, plan, example)


class Unannotated(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 4)))

    def __call__(self, x):
        return x @ self.w


def test_parameter_without_logical_axes_names_its_path(compiles):
    with pytest.raises(PlanError, match=r"parameter w \(shape \(4, 4\)\) has no logical axes"):
        jaxpar.parallelize(Unannotated, optax.sgd(0.1), lambda m, b: m(b).sum(),
                           jaxpar.named_plan("dp8", 8), np.zeros((8, 4), np.float32))
    assert not compiles


def test_batch_not_divisible_by_data_parallel_size(compiles):
    with pytest.raises(PlanError, match=r"batch size 12 .* data-parallel size 8 .* batch of 8"):
        parallelize(build("tiny"), jaxpar.named_plan("dp8", 8), batch(12))
    with pytest.raises(PlanError, match=r"batch size 20 .* 4 x microbatches 2 = 8.* batch of 16"):
        parallelize(build("tiny"), jaxpar.named_plan("dp4+tp2", 8, microbatches=2), batch(20))
    assert not compiles


def test_mesh_product_must_equal_device_count(compiles):
    with pytest.raises(PlanError, match=r"mesh data=4 has 4 devices but 8 are available"):
        parallelize(build("tiny"), jaxpar.Plan(mesh=(("data", 4),)), batch())
    with pytest.raises(PlanError, match="has 16 devices but 8"):
        jaxpar.named_plan("dp2+tp8", 8)
    assert not compiles


def test_mesh_axis_that_does_not_divide_a_dimension(compiles):
    with pytest.raises(PlanError, match=r"blocks/attention/out/kernel: dimension 'heads' has "
                                        r"size 4, which mesh axes tensor \(size 8\) do not divide"):
        parallelize(build("tiny", heads=4, head_dim=16), jaxpar.named_plan("tp8", 8), batch())
    assert not compiles


def test_unknown_plan_spec_and_logical_axis():
    with pytest.raises(PlanError, match="unknown plan 'xp4': write components pp, dp, fsdp, sp"):
        jaxpar.named_plan("xp4", 8)
    with pytest.raises(PlanError, match="mesh axis sequence=8 is named by no rule"):
        jaxpar.named_plan("sp8", 8)
    plan = jaxpar.named_plan("dp8", 8)
    with pytest.raises(PlanError, match="logical axis 'channels' has no rule"):
        plan.layout(("batch", "channels"))
