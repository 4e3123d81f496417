"""auto_parallelize(pipeline=True): the stage planner's pick runs and trains like one device,
and the plan says why pipelining won or lost."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

import jaxpar
from jaxpar.models import gpt
from jaxpar.plan import PlanError
from jaxpar.planners.cluster import Cluster

from oracle import assert_same_run, single_device_run, token_batches

MODEL = gpt.build("tiny", layers=4, embed=32, heads=4, vocab=64, length=16)
BATCHES = token_batches(batch=16, length=16, steps=2, vocab=64)
# 4 nodes of 2 devices: fast inside a node, a slow network between nodes, so gradient
# all-reduces across nodes cost more than sending activations from stage to stage
SLOW_NETWORK = Cluster("test", num_nodes=4, devices_per_node=2, peak_flops=1e10,
                       memory_bytes=2**30, intra_node_bandwidth=1e10, intra_node_latency=1e-5,
                       inter_node_bandwidth=1e5, inter_node_latency=1e-3)
FAST_NETWORK = dataclasses.replace(SLOW_NETWORK, inter_node_bandwidth=1e10,
                                   inter_node_latency=1e-5)


OPTIMIZERS = {"adamw": lambda: optax.adamw(1e-2),
              "clipped": lambda: optax.chain(optax.clip_by_global_norm(0.05), optax.adamw(1e-2))}


# launching a program: free, or so slow that one SPMD program beats an MPMD launch per op;
# an update coupling the chunks (the global norm) leaves the SPMD form only
@pytest.mark.parametrize("dispatch,optimizer,form,priced", [
    (0.0, "adamw", "mpmd", {"mpmd", "spmd"}), (0.05, "adamw", "spmd", {"mpmd", "spmd"}),
    (0.0, "clipped", "spmd", {"spmd"})])
def test_a_pipeline_wins_on_a_slow_network_and_trains_like_one_device(dispatch, optimizer,
                                                                      form, priced):
    cluster = dataclasses.replace(SLOW_NETWORK, dispatch_latency=dispatch)
    optimizer = OPTIMIZERS[optimizer]
    par = jaxpar.auto_parallelize(MODEL, optimizer(), gpt.lm_stages, BATCHES[0],
                                  cluster=cluster, pipeline=True)
    plan = par.plan
    assert plan.pipeline is not None and plan.stages > 1
    assert plan.pipeline.bubble is not None and sum(plan.pipeline.cut) == 4
    assert plan.pipeline.form == form
    forms = plan.predicted.forms
    assert set(forms) == priced and min(forms, key=forms.get) == form
    flat = plan.alternatives[0]
    assert flat.name.startswith("no pipeline") and flat.step_s > plan.predicted.step_s
    assert "no pipeline" in plan.explain() and "SPMD form" in plan.explain()
    state = par.init(jax.random.key(0))
    losses = []
    for batch in BATCHES:
        state, metrics = par.step(state, par.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    want = single_device_run(MODEL, optimizer(), gpt.lm_stages, BATCHES)
    assert_same_run((np.array(losses), par.params_of(state)), want, elementwise=False)


def test_without_a_slow_network_the_plan_says_why_no_pipeline():
    par = jaxpar.auto_parallelize(MODEL, optax.adamw(1e-2), gpt.lm_stages, BATCHES[0],
                                  cluster=FAST_NETWORK, pipeline=True)
    assert par.plan.pipeline is None
    assert par.plan.alternatives[0].name.startswith("best pipeline")
    assert "best pipeline" in par.plan.explain()


def test_pipelines_need_a_stages_loss():
    with pytest.raises(PlanError, match="needs the loss as a jaxpar.Stages"):
        jaxpar.auto_parallelize(MODEL, optax.adamw(1e-2), gpt.lm_loss, BATCHES[0],
                                cluster=SLOW_NETWORK, pipeline=True)
