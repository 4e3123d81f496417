"""Every named plan trains exactly like the single-device program (the correctness oracle)."""

import jax
import numpy as np
import optax
import pytest

import jaxpar
from jaxpar.models.gpt import build, lm_loss
from jaxpar.plan import DEFAULT_RULES
from jaxpar.planners.sharding.search import replicate_over_fsdp

from oracle import assert_same_run, parallel_run, single_device_run, token_batches

STEPS, BATCH, LENGTH = 3, 16, 32
OPTIMIZERS = {"sgd": lambda: optax.sgd(1.0), "adamw": lambda: optax.adamw(1e-3)}


def run_plan(model_fn, plan, batches, optimizer):
    par = jaxpar.parallelize(model_fn, optimizer, lm_loss, plan, batches[0])
    return parallel_run(par, batches)


def check_plan(model_fn, plan, batches, optimizer_name, reference=None):
    optimizer = OPTIMIZERS[optimizer_name]()
    want = reference or single_device_run(model_fn, optimizer, lm_loss, batches)
    got = run_plan(model_fn, plan, batches, optimizer)
    assert_same_run(got, want, elementwise=optimizer_name == "sgd")


@pytest.fixture(scope="module")
def batches():
    return token_batches(BATCH, LENGTH, STEPS)


@pytest.fixture(scope="module")
def references(batches):
    return {name: single_device_run(build("tiny"), make(), lm_loss, batches)
            for name, make in OPTIMIZERS.items()}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("spec", ["dp8", "fsdp8", "tp8", "dp2+tp4", "fsdp2+tp4", "dp2+fsdp2+tp2"])
def test_named_plan_matches_single_device(spec, optimizer, batches, references):
    plan = jaxpar.named_plan(spec, 8)
    check_plan(build("tiny"), plan, batches, optimizer, references[optimizer])


@pytest.mark.parametrize("spec, options", [
    ("dp2+fsdp4", {"microbatches": 2}),
    ("fsdp4+tp2", {"remat": True}),
    ("dp2+fsdp2+tp2", {"remat": "dots", "microbatches": 2}),
    ("dp4+tp2", {"zero": 1, "microbatches": 2}),
    ("fsdp8", {"grad_reduce": "all-reduce"}),
    ("dp2+fsdp2+tp2", {"grad_reduce": "all-reduce", "microbatches": 2}),
])
def test_microbatches_remat_and_zero_match_single_device(spec, options, batches, references):
    plan = jaxpar.named_plan(spec, 8, **options)
    check_plan(build("tiny"), plan, batches, "adamw", references["adamw"])


def test_group_rules_match_single_device(batches, references):
    """The stacked blocks replicated over fsdp while the embedding stays split."""
    rules = (("^blocks/", replicate_over_fsdp(DEFAULT_RULES)),)
    plan = jaxpar.named_plan("fsdp4+tp2", 8, group_rules=rules)
    check_plan(build("tiny"), plan, batches, "adamw", references["adamw"])


def test_rotary_untied_variant_matches_single_device(batches):
    model_fn = build("tiny", positions="rotary", tied=False)
    check_plan(model_fn, jaxpar.named_plan("fsdp2+tp4", 8), batches, "sgd")


def test_plan_json_round_trip_gives_identical_step(batches):
    plan = jaxpar.named_plan("dp2+fsdp2+tp2", 8, microbatches=2)
    optimizer = optax.adamw(1e-3)
    par = jaxpar.parallelize(build("tiny"), optimizer, lm_loss, plan, batches[0])
    loaded = jaxpar.Plan.from_json(par.plan.to_json())
    assert loaded == par.plan
    again = jaxpar.parallelize(build("tiny"), optimizer, lm_loss, loaded, batches[0])
    assert again.lower(batches[0]).as_text() == par.lower(batches[0]).as_text()
    first = run_plan(build("tiny"), plan, batches, optimizer)
    second = run_plan(build("tiny"), loaded, batches, optimizer)
    np.testing.assert_array_equal(first[0], second[0])
    jax.tree.map(np.testing.assert_array_equal, first[1], second[1])
