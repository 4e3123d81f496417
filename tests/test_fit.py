"""Fitting the cost model's scales to step times: the terms add up to the prediction, a fit
recovers the scales that made the times, and the scaled cluster predicts them. Pure planning:
no jax, no devices."""

import dataclasses
import math

import pytest
from test_search import transformer

from jaxpar.named import named_plan
from jaxpar.planners.cluster import a100_80gb
from jaxpar.planners.cost import predict
from jaxpar.planners.fit import MIN_SCALES, TERMS, fit_scales, scaled, step_terms

SPECS = ("dp8", "fsdp8", "tp8", "dp2+tp4", "dp4+fsdp2", "fsdp2+tp4", "dp2+fsdp2+tp2")


@pytest.fixture(scope="module")
def steps():
    graph = transformer(layers=4, embed=1024, heads=8, mlp=4096, vocab=8192, batch=16,
                        length=512)
    cluster = dataclasses.replace(a100_80gb(), intra_node_collectives={
        "all-gather": {"bandwidth": 200e9, "latency": 8e-6}})
    plans = [named_plan(s, 8, microbatches=m, remat=r).bind(graph.params)
             for s in SPECS for m, r in ((1, False), (2, False), (1, True))]
    return graph, cluster, plans, [step_terms(graph, p, cluster) for p in plans]


def test_terms_add_up_to_the_predicted_step_time(steps):
    graph, cluster, plans, terms = steps
    for plan, t in zip(plans, terms):
        assert set(t) == set(TERMS) and all(v >= 0 for v in t.values())
        assert sum(t.values()) == pytest.approx(predict(graph, plan, cluster).step_s, rel=1e-12)
    # every term varies across the plans, so each scale is determined by the times
    assert all(len({round(t[k], 12) for t in terms}) > 1 for k in TERMS)


@pytest.mark.parametrize("truth", [{"compute": 1.2, "latency": 3.0, "transfer": 4.5,
                                    "memory": 0.7},
                                   {"compute": 1.5, "latency": 1.0, "transfer": 2.0,
                                    "memory": 0.0}])
def test_fit_recovers_the_scales_and_the_scaled_cluster_predicts_the_times(steps, truth):
    graph, cluster, plans, terms = steps
    seconds = [sum(truth[k] * t[k] for k in TERMS) for t in terms]
    scales = fit_scales(terms, seconds)
    assert scales == pytest.approx(truth, rel=1e-6, abs=1e-9)
    fitted = scaled(cluster, scales)
    for plan, want in zip(plans, seconds):
        assert predict(graph, plan, fitted).step_s == pytest.approx(want, rel=1e-6)
    if truth["memory"] == 0:
        assert fitted.memory_bandwidth == math.inf
    assert fitted.intra_node_collectives["all-gather"]["latency"] == pytest.approx(
        8e-6 * truth["latency"])


def test_matmuls_and_collectives_never_run_faster_than_alone(steps):
    _, _, _, terms = steps
    # times that would price compute and collective latency at nothing, memory at 3x
    seconds = [0.5 * t["transfer"] + 3 * t["memory"] for t in terms]
    scales = fit_scales(terms, seconds)
    assert all(scales[k] >= MIN_SCALES[k] for k in TERMS)
    assert scales["compute"] == scales["latency"] == scales["transfer"] == pytest.approx(1.0)


def test_too_few_steps_are_refused(steps):
    _, _, _, terms = steps
    with pytest.raises(ValueError, match="at least 4 timed steps, got 3"):
        fit_scales(terms[:3], [1.0, 2.0, 3.0])

