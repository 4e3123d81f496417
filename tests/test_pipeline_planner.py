"""The pipeline planner on analytic GPT graphs: fast, at least as good as Megatron-LM's own
configurations under the same cost model, an exact DP cut, and clear errors. Pure planning:
no jax, no devices."""

import dataclasses
import itertools
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest

from jaxpar.named import named_plan
from jaxpar.pipelining import SCHEDULES
from jaxpar.plan import Plan, PlanError
from jaxpar.planners.cluster import a100_80gb
from jaxpar.planners.graph import Tensor
from jaxpar.planners.megatron import MIXED, gpt_graph, megatron_table, paper_step, row_graph
from jaxpar.planners.pipeline.cost import (
    Cost,
    Pricer,
    live_bytes,
    piece_cost,
    pipeline_bound,
    proxy_memory,
    sync_time,
)
from jaxpar.planners.pipeline.cut import cut_layers, max_layers
from jaxpar.planners.pipeline.parts import rescale, stage_parts, subcluster
from jaxpar.planners.pipeline.result import step_flops
from jaxpar.planners.pipeline.search import evaluate_pipeline, plan_pipeline
from jaxpar.planners.schedules.generators import in_flight, make_schedule, schedule_allows
from jaxpar.planners.schedules.simulator import simulate

GiB = 2**30
CSV = Path(__file__).resolve().parents[1] / "data" / "megatron_gpt_configs.csv"
ROWS = megatron_table(CSV)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r['params_billion']}B" for r in ROWS])
def test_megatron_rows_planned_fast_and_no_slower_than_the_paper(row):
    graph = row_graph(row)
    cluster = a100_80gb(row["gpus"] // 8)
    start = time.process_time()
    plan = plan_pipeline(graph, cluster, options=MIXED)
    elapsed = time.process_time() - start
    assert elapsed < 10.0, f"planning took {elapsed:.1f} s"
    assert plan.predicted.step_s <= paper_step(graph, cluster, row) * (1 + 1e-9)
    assert plan.predicted.total_bytes <= cluster.memory_bytes
    assert plan.num_devices == cluster.num_devices
    if plan.pipeline is not None:
        assert sum(plan.pipeline.cut) == row["layers"]
        assert max(plan.predicted.stage_bytes) == plan.predicted.total_bytes


def test_dp_cut_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        layers, chunks = rng.randint(2, 9), rng.randint(1, 4)
        chunks = min(chunks, layers)
        times = [rng.uniform(0.5, 3.0) for _ in range(layers)]
        first, last = rng.uniform(0, 2), rng.uniform(0, 2)
        limit = [rng.randint(1, layers) for _ in range(chunks)]  # most layers chunk c may take
        idx = np.arange(layers + 1)

        def fits(c, limit=limit, idx=idx):
            return (idx[None, :] - idx[:, None]) <= limit[c]

        best = math.inf
        for cuts in itertools.combinations(range(1, layers), chunks - 1):
            edges = (0,) + cuts + (layers,)
            ranges = list(zip(edges, edges[1:]))
            if any(j - i > limit[c] for c, (i, j) in enumerate(ranges)):
                continue
            best = min(best, max(sum(times[i:j]) + first * (c == 0) + last * (c == chunks - 1)
                                 for c, (i, j) in enumerate(ranges)))
        found = cut_layers(times, chunks, first, last, fits)
        if math.isinf(best):
            assert found is None
            continue
        ranges, bottleneck = found
        assert bottleneck == pytest.approx(best, rel=1e-12)
        assert ranges[0][0] == 0 and ranges[-1][1] == layers
        assert all(i < j and j - i <= limit[c] for c, (i, j) in enumerate(ranges))
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("name", SCHEDULES)
def test_in_flight_counts_match_the_schedules(name):
    for p, m, v in itertools.product((1, 2, 3, 4), (1, 2, 3, 4, 6, 8, 12), (1, 2, 3)):
        if (v > 1 and name != "interleaved_1f1b") or not schedule_allows(name, p, m, v):
            continue
        schedule = make_schedule(name, p, m, v)
        chunks, split = p * v, schedule.splits_backward
        ones, zeros = [1.0] * chunks, [0.0] * chunks
        counted = tuple((live_bytes(ops, ones, zeros, split), live_bytes(ops, zeros, ones, split))
                        for ops in schedule.ops)
        assert counted == in_flight(name, p, m, v), (p, m, v)
        assert tuple(c for c, _ in counted) == simulate(schedule).peak_stash


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_allows_exactly_what_the_generators_accept(name):
    for p, m, v in itertools.product(range(1, 6), range(1, 11), (1, 2, 3)):
        if v > 1 and name != "interleaved_1f1b":
            with pytest.raises(ValueError, match="interleaved_1f1b"):
                make_schedule(name, p, m, v)
            continue
        try:
            make_schedule(name, p, m, v)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == schedule_allows(name, p, m, v), (p, m, v)


@pytest.mark.parametrize("name, v", [("gpipe", 1), ("1f1b", 1), ("zero_bubble_h1", 1),
                                     ("interleaved_1f1b", 2), ("interleaved_1f1b", 3)])
def test_pipeline_bound_is_a_lower_bound_tight_for_equal_chunks(name, v):
    rng = random.Random(1)
    p, m = 4, 8
    for _ in range(10):
        costs = [Cost(f=rng.uniform(0.5, 1.5), b=rng.uniform(0.5, 2.0), w=rng.uniform(0.2, 1.0))
                 for _ in range(p * v)]
        p2p = rng.uniform(0.0, 0.2)
        step = simulate(make_schedule(name, p, m, v), [c.f for c in costs],
                        [c.b for c in costs], [c.w for c in costs], p2p).step_time
        assert pipeline_bound(costs, name, p, m, v, p2p) <= step * (1 + 1e-12)
    equal = [Cost(f=1.0, b=1.0, w=1.0)] * (p * v)
    step = simulate(make_schedule(name, p, m, v), 1.0, 1.0, 1.0).step_time
    assert pipeline_bound(equal, name, p, m, v, 0.0) == pytest.approx(step)


def test_stage_parts_move_the_tied_head_last_and_keep_every_flop():
    graph = gpt_graph(1024, 16, 12, batch=8, length=512, vocab=8192)
    parts = stage_parts(graph)
    assert [g.name for g in parts.first] == ["embed", "positions"]
    assert [g.name for g in parts.last] == ["final_norm", "embed"]
    assert parts.tied == ("embed/table",) and parts.layers == 12
    assert not parts.first[0].matmuls and not parts.first[0].saved
    head = parts.last[1]
    assert [mm.param for mm in head.matmuls] == ["embed/table"] and head.saved
    total = sum(g.flops_fwd for g in parts.first + parts.last) + 12 * parts.layer.flops_fwd
    assert total == pytest.approx(graph.flops_fwd)
    assert all(p.shape[0] == 1 for p in parts.layer.params)
    half = rescale(parts.layer, 0.5)
    assert half.flops_fwd == parts.layer.flops_fwd / 2
    assert half.saved_bytes == parts.layer.saved_bytes / 2
    assert [mm.in_bytes for mm in half.matmuls] == [mm.in_bytes / 2 for mm in parts.layer.matmuls]
    assert half.param_bytes == parts.layer.param_bytes
    traced = dataclasses.replace(parts.layer, saved_remat=(
        Tensor((8, 512, 1024), 8 * 512 * 1024 * 2, ("batch", "length", "embed")),))
    assert rescale(traced, 0.25).saved_remat[0].shape == (2, 512, 1024)


def test_pricing_once_per_fsdp_x_tensor_equals_pricing_each_stage_mesh():
    """The planner prices a microbatch on 1 x fsdp x tensor and the per-step terms on the
    stage mesh; that equals `piece_cost` on the stage mesh itself."""
    graph = gpt_graph(2048, 16, 8, batch=64, length=1024, vocab=8192)
    cluster = a100_80gb(num_nodes=4)
    pricer = Pricer(graph, cluster, MIXED)
    for spec, zero, remat, b in (("dp8+tp2", 1, True, 2), ("dp4+fsdp2+tp2", 0, False, 1),
                                 ("dp8+fsdp2", 1, True, 4)):
        plan = dataclasses.replace(named_plan(spec, 16), zero=zero, remat=remat)
        model = pricer.model(2, plan, b)
        sub = subcluster(cluster, 16)
        factor = b * plan.data_parallel_size / graph.batch_size
        layer = pricer.parts.layer
        direct = piece_cost(rescale(layer, factor), plan, sub, MIXED, sync_time(layer, plan, sub))
        for field in dataclasses.fields(Cost):
            assert getattr(model.layer, field.name) == pytest.approx(
                getattr(direct, field.name), rel=1e-9), (spec, field.name)


def test_evaluate_pipeline_errors_name_the_numbers():
    graph = gpt_graph(1024, 16, 8, batch=32, length=512, vocab=8192)
    cluster = a100_80gb(num_nodes=2)
    with pytest.raises(ValueError, match=r"8 layers cannot be cut into p \* v = 4 \* 4 = 16 "
                                         r"chunks.*p \* v <= 8"):
        evaluate_pipeline(graph, cluster, p=4, v=4, m=8, schedule="interleaved_1f1b",
                          mesh="dp4")
    with pytest.raises(ValueError, match=r"multiple of the pipeline degree.*m=6, p=4: use m=4 "
                                         r"or m=8"):
        evaluate_pipeline(graph, cluster, p=4, v=2, m=6, schedule="interleaved_1f1b",
                          mesh="dp4")
    with pytest.raises(ValueError, match=r"ZB-H1 needs .* m=2, p=4: use m >= 4"):
        evaluate_pipeline(graph, cluster, p=4, m=2, schedule="zero_bubble_h1", mesh="dp4")
    with pytest.raises(ValueError, match=r"p=3 stages do not divide 16 devices"):
        evaluate_pipeline(graph, cluster, p=3, m=8, mesh="dp4")
    with pytest.raises(PlanError, match=r"m=5 microbatches; choose m dividing 8"):
        evaluate_pipeline(graph, cluster, p=4, m=5, mesh="dp4")
    with pytest.raises(PlanError, match=r"no cut of 8 layers into 4 chunks fits 512\.00 MiB per "
                                        r"device .* rank 0 with 2-layer chunks and 4 microbatch "
                                        r"chunks stashed needs \d+\.\d+ [KMGT]iB .*; try remat"):
        evaluate_pipeline(graph, cluster, p=4, m=8, mesh="dp4", remat=False,
                          memory_budget=0.5 * GiB)


def test_a_tight_budget_is_respected_by_the_cut_and_the_search():
    graph = gpt_graph(2048, 16, 16, batch=32, length=2048, vocab=8192)
    cluster = a100_80gb(num_nodes=2)
    roomy = evaluate_pipeline(graph, cluster, p=4, m=8, mesh="dp4", remat=False,
                              options=MIXED)
    budget = 0.8 * roomy.predicted.total_bytes
    tight = plan_pipeline(graph, cluster, budget, MIXED)
    assert tight.predicted.total_bytes <= budget
    assert all(b <= budget for b in tight.predicted.stage_bytes)
    roomy_pick = plan_pipeline(graph, cluster, options=MIXED)
    assert tight.predicted.step_s >= roomy_pick.predicted.step_s
    with pytest.raises(PlanError, match=r"no cut of 16 layers into 16 chunks fits 51\.20 MiB "
                                        r".* needs \d+\.\d+ [KMGT]iB .*; try more devices"):
        plan_pipeline(graph, cluster, 0.05 * GiB, MIXED)


def test_layer_caps_solve_the_memory_formula():
    """`max_layers` (the estimate's closed form) agrees with `proxy_memory` (the DP's)."""
    graph = gpt_graph(2048, 16, 24, batch=64, length=2048, vocab=8192)
    pricer = Pricer(graph, a100_80gb(num_nodes=2), MIXED)
    for spec, remat, v, stashed, held in (("dp4", True, 1, 4, 0), ("dp2+tp2", False, 2, 7, 0),
                                          ("dp2+fsdp2", True, 1, 4, 3)):
        plan = dataclasses.replace(named_plan(spec, 4), remat=remat)
        model = pricer.model(4, plan, 2)
        for extras in (Cost(), model.first, model.last):
            def memory(k, extras=extras, v=v, stashed=stashed, held=held, model=model):
                return sum(proxy_memory(model.layer * k, extras, v, stashed, held,
                                         model).values())

            budget = memory(5) * 1.001
            assert max_layers(model, extras, v, stashed, held, budget) == 5
            assert memory(6) > budget


def test_plan_round_trips_through_json_and_explains_the_choice():
    graph = gpt_graph(1024, 16, 12, batch=32, length=1024, vocab=8192)
    for nodes in (1, 2):
        plan = plan_pipeline(graph, a100_80gb(num_nodes=nodes), options=MIXED)
        again = Plan.from_json(plan.to_json())
        assert again.explain() == plan.explain() and again.to_json() == plan.to_json()
        text = plan.explain()
        assert plan.name in text and "runner-up" in text
        lost = "no pipeline" if plan.pipeline is not None else "best pipeline"
        assert plan.alternatives[0].name.startswith(lost)
        step = plan.predicted.step_s
        assert all(a.step_s >= step for a in plan.alternatives if a.step_s == a.step_s)


def test_the_pipeline_becomes_a_plan_with_stages_cut_and_schedule():
    graph = gpt_graph(1024, 16, 12, batch=32, length=1024, vocab=8192)
    plan = evaluate_pipeline(graph, a100_80gb(num_nodes=2), p=4, m=8, mesh="dp2+tp2",
                             options=MIXED)
    assert plan.stages == 4 and plan.num_devices == 16 and plan.microbatches == 8
    assert plan.pipeline.schedule == "1f1b" and plan.pipeline.virtual == 1
    assert sum(plan.pipeline.cut) == 12 and len(plan.pipeline.cut) == 4
    assert 0 < plan.pipeline.bubble < 1 and len(plan.predicted.stage_bytes) == 4
    pr = plan.predicted
    assert pr.step_s == pytest.approx(pr.forms[plan.pipeline.form])
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()  # NaN != NaN
    plan.check_pipeline()
    assert "pipeline: " in str(plan) and "memory per device by stage" in plan.explain()


def test_step_flops_count_recomputation_of_the_stack_only():
    graph = gpt_graph(1024, 16, 12, batch=8, length=512, vocab=8192)
    model, hardware = step_flops(graph, remat="full")
    blocks = next(g for g in graph.groups if g.name == "blocks")
    assert model == 3 * graph.flops_fwd
    assert hardware - model == pytest.approx(12 * blocks.flops_fwd)
    assert step_flops(graph, remat="none") == step_flops(graph, remat="dots") == (model, model)


def test_both_forms_are_priced_and_the_faster_runs():
    graph = gpt_graph(1024, 16, 12, batch=32, length=1024, vocab=8192)
    cluster = a100_80gb(num_nodes=1)
    plain = evaluate_pipeline(graph, cluster, p=4, m=8, mesh="dp2", options=MIXED)
    forms = plain.predicted.forms
    assert set(forms) == {"mpmd", "spmd"} and plain.pipeline.form == min(forms, key=forms.get)
    # lock-step ticks never beat the event-driven schedule when launching costs nothing
    assert plain.pipeline.form == "mpmd" and forms["spmd"] >= forms["mpmd"]
    assert "SPMD form" in plain.explain() and "(chosen)" in plain.explain()
    # one program beats a launch per op once launching is slow enough
    slow = dataclasses.replace(cluster, dispatch_latency=0.05)
    launched = evaluate_pipeline(graph, slow, p=4, m=8, mesh="dp2", options=MIXED)
    assert launched.pipeline.form == "spmd"
    assert launched.predicted.forms["mpmd"] >= 0.05 * 2 * 8 * 4  # every F and B launched
    # the SPMD runtime needs ZeRO 0 and equal chunks: nothing else is priced in its form
    zero = evaluate_pipeline(graph, slow, p=4, m=8, mesh="dp2", zero=1, options=MIXED)
    uneven = evaluate_pipeline(graph, slow, p=8, m=8, mesh="dp1", options=MIXED)
    for only_mpmd in (zero, uneven):
        assert list(only_mpmd.predicted.forms) == ["mpmd"]
        assert "SPMD form not priced" in only_mpmd.explain()


def test_a_search_limited_to_one_form_prices_and_returns_that_form_only():
    row = next(r for r in ROWS if r["params_billion"] == 145.6)
    graph, cluster = row_graph(row), a100_80gb(row["gpus"] // 8)
    free = plan_pipeline(graph, cluster, options=MIXED)
    for forms in (("spmd",), ("mpmd",)):
        plan = plan_pipeline(graph, cluster, options=MIXED, forms=forms)
        assert plan.pipeline is not None and plan.pipeline.form == forms[0]
        assert list(plan.predicted.forms) == list(forms)
        assert plan.predicted.step_s >= free.predicted.step_s * (1 - 1e-9)
