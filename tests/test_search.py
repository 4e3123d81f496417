"""The sharding planner on made-up models and clusters: exact, fast, and clear when nothing
fits. Pure planning: no jax, no devices."""

import dataclasses
import itertools
import math

import pytest

from jaxpar.named import named_plan
from jaxpar.plan import GRAD_REDUCE, REMAT, ParamInfo, Plan, PlanError
from jaxpar.planners.cluster import a100_80gb
from jaxpar.planners.cost import Options, group_terms, predict
from jaxpar.planners.graph import Group, Matmul, ModelGraph, Tensor
from jaxpar.planners.pipeline.cost import piece_cost
from jaxpar.planners.sharding.search import (
    describe,
    divisors,
    grad_reductions,
    group_pattern,
    merging_grad_reduce,
    mesh_shapes,
    plan_sharding,
    replicate_over_fsdp,
)
from jaxpar.planners.units import BINARY_UNITS

GiB = 2**30


def transformer(layers=24, embed=2048, heads=16, mlp=8192, vocab=51200, batch=64, length=2048):
    """A GPT-like ModelGraph written by hand (fp32 bytes), as the tracer would report it."""
    bt = batch * length
    act = (("batch", "length", "embed"), bt * embed * 4)
    hidden = (("batch", "length", "mlp"), bt * mlp * 4)
    qkv = (("batch", "length", "heads", "kv"), bt * embed * 4)

    def tensors(*specs):
        return tuple(Tensor((), nbytes, axes) for axes, nbytes in specs)

    def p(path, shape, axes):
        return ParamInfo(path, shape, "float32", axes)

    block_params = (
        p("blocks/q", (layers, embed, heads, embed // heads), ("layers", "embed", "heads", "kv")),
        p("blocks/o", (layers, heads, embed // heads, embed), ("layers", "heads", "kv", "embed")),
        p("blocks/up", (layers, embed, mlp), ("layers", "embed", "mlp")),
        p("blocks/down", (layers, mlp, embed), ("layers", "mlp", "embed")),
        p("blocks/norm", (layers, embed), ("layers", "embed")),
    )
    mm = 2 * bt * embed
    block_matmuls = (
        Matmul("blocks/q", ("embed",), ("heads", "kv"), 3 * mm * embed, 3 * bt * embed * 4,
               bt * embed * 4),
        Matmul("blocks/o", ("heads", "kv"), ("embed",), mm * embed, bt * embed * 4,
               bt * embed * 4),
        Matmul("blocks/up", ("embed",), ("mlp",), mm * mlp, bt * mlp * 4, bt * embed * 4),
        Matmul("blocks/down", ("mlp",), ("embed",), mm * mlp, bt * embed * 4, bt * mlp * 4),
    )
    attention = 4 * bt * length * embed
    blocks = Group("blocks", layers, block_params, block_matmuls,
                   sum(m.flops for m in block_matmuls) + attention,
                   tensors(act, act, qkv, qkv, qkv, hidden, hidden, act), tensors(act),
                   tensors(act, qkv, qkv, qkv, hidden, act))
    table = p("embed/table", (vocab, embed), ("vocab", "embed"))
    logits = Matmul("embed/table", ("embed",), ("vocab",), 2 * bt * embed * vocab,
                    bt * vocab * 4, bt * embed * 4)
    embed_group = Group("embed", 1, (table,), (logits,), logits.flops,
                        *[tensors(act, (("batch", "length", "vocab"), bt * vocab * 4))] * 3)
    return ModelGraph((embed_group, blocks), batch, 2 * bt * 4)


def every_plan(graph, cluster):
    """Every valid plan the sharding search weighs, by brute force: the search's oracle."""
    for mesh in mesh_shapes(cluster.num_devices):
        base = Plan(mesh=mesh)
        dp = base.data_parallel_size
        for zero, remat, m, reduce in itertools.product((0, 1), REMAT,
                                                        divisors(graph.batch_size // dp),
                                                        GRAD_REDUCE):
            for shard in itertools.product((True, False), repeat=len(graph.groups)):
                rules = tuple((group_pattern(g.name), replicate_over_fsdp(base.rules))
                              for g, on in zip(graph.groups, shard) if not on)
                candidate = dataclasses.replace(base, zero=zero, remat=remat, microbatches=m,
                                                group_rules=rules, grad_reduce=reduce)
                try:
                    for info in graph.params:
                        candidate.check_param(info)
                except PlanError:
                    continue
                yield candidate


def test_mesh_shapes_are_every_factorisation():
    shapes = mesh_shapes(1024)
    assert len(shapes) == 66 and len(set(shapes)) == 66
    assert all(math.prod(s for _, s in mesh) == 1024 for mesh in shapes)
    assert sum(1 for _ in mesh_shapes(8)) == 10
    assert mesh_shapes(4, ("sequence", "expert")) == [(("sequence", 4), ("expert", 1)),
                                                       (("sequence", 2), ("expert", 2)),
                                                       (("sequence", 1), ("expert", 4))]
    assert mesh_shapes(6, ("data",)) == [(("data", 6),)] and mesh_shapes(1, ()) == [()]


def test_the_cost_model_prices_a_mesh_by_its_axes_not_by_a_fixed_three():
    """Absent axes are size-1 axes: a subset mesh, reordered or with extra size-1 axes,
    prices the same as the full data x fsdp x tensor mesh."""
    graph = transformer(layers=2, embed=256, heads=4, mlp=1024, vocab=1024, batch=16,
                        length=128)
    cluster = a100_80gb(num_nodes=1)
    full = predict(graph, Plan(mesh=(("data", 2), ("fsdp", 1), ("tensor", 4))), cluster)
    for mesh in ((("data", 2), ("tensor", 4)),
                 (("data", 2), ("sequence", 1), ("tensor", 4), ("expert", 1))):
        assert predict(graph, Plan(mesh=mesh), cluster) == full


# A cluster whose compiler merges independent all-reduces only (XLA's CPU backend), with a
# latency high enough for an fsdp layer's one merged all-reduce to beat its reduce-scatters.
MERGES_ALL_REDUCES = dataclasses.replace(a100_80gb(num_nodes=1), combined_kinds=("all-reduce",),
                                         intra_node_latency=5e-3)


@pytest.mark.parametrize("cluster", [a100_80gb(num_nodes=1), MERGES_ALL_REDUCES],
                         ids=["a100", "merges-all-reduces"])
def test_the_milp_finds_the_optimum_of_brute_force(cluster):
    graph = transformer(layers=4, embed=1024, heads=8, mlp=4096, vocab=8192, batch=16,
                        length=512)
    budget = 3 * GiB
    plan = plan_sharding(graph, cluster, budget)
    best = math.inf
    for candidate in every_plan(graph, cluster):
        pr = predict(graph, candidate, cluster)
        if pr.total_bytes <= budget:
            best = min(best, pr.step_s)
    assert plan.predicted.step_s == pytest.approx(best, rel=1e-9)
    assert plan.predicted.total_bytes <= budget
    assert plan.predicted.gap is not None and plan.predicted.gap <= 1e-4


def test_a_tight_budget_forces_sharding_and_remat():
    graph = transformer(layers=8, embed=2048, heads=16, mlp=8192, vocab=51200, batch=32)
    cluster = a100_80gb(num_nodes=1)
    roomy = plan_sharding(graph, cluster, 80 * GiB)
    tight = plan_sharding(graph, cluster, roomy.predicted.total_bytes / 3)
    assert tight.predicted.total_bytes <= roomy.predicted.total_bytes / 3
    assert tight.predicted.step_s >= roomy.predicted.step_s
    shards = tight.mesh_shape["fsdp"] * tight.mesh_shape["tensor"]
    assert shards > 1 or tight.remat != "none" or tight.microbatches > 1


def test_infeasible_budget_names_the_smallest_memory_and_the_devices_that_fit():
    graph = transformer(layers=8, batch=32)
    with pytest.raises(PlanError, match=r"the smallest needs \d+\.\d+ [KMGT]iB per device .* "
                                        r"the budget is 512\.00 MiB.* or use >= \d+ devices"
                       ) as err:
        plan_sharding(graph, a100_80gb(num_nodes=1), 0.5 * GiB)
    figure, unit = err.value.args[0].split("smallest needs ")[1].split(" per device")[0].split()
    least = float(figure) * 1024 ** BINARY_UNITS.index(unit)
    assert plan_sharding(graph, a100_80gb(num_nodes=1), least * 1.01)  # 2 decimals shown


def test_explain_lists_runners_up_with_reasons():
    graph = transformer(layers=4, embed=1024, heads=8, mlp=4096, vocab=8192, batch=16)
    plan = plan_sharding(graph, a100_80gb(num_nodes=1), 80 * GiB)
    text = plan.explain()
    assert plan.name in text and "runner-up" in text
    assert len(plan.alternatives) == 8
    assert all(a.step_s >= plan.predicted.step_s for a in plan.alternatives)
    assert Plan.from_json(plan.to_json()).explain() == text


def test_group_patterns_match_top_level_parameters_and_nothing_else():
    base = Plan(mesh=(("data", 1), ("fsdp", 8), ("tensor", 1)))
    plan = dataclasses.replace(base, group_rules=(
        (group_pattern("positions"), replicate_over_fsdp(base.rules)),
        (group_pattern("blocks"), replicate_over_fsdp(base.rules))))
    table = ParamInfo("positions", (128, 64), "float32", ("length", "embed"))
    kernel = ParamInfo("blocks/mlp/up", (4, 64, 256), "float32", ("layers", "embed", "mlp"))
    other = ParamInfo("positions_extra/table", (128, 64), "float32", ("length", "embed"))
    assert plan.param_layout(table) == ((), ())
    assert plan.param_layout(kernel) == ((), (), ())
    assert plan.param_layout(other) == ((), ("fsdp",))
    assert describe(plan) == "fsdp8 (positions,blocks unsharded)"


def test_fewest_microbatches_win_when_memory_allows():
    graph = transformer(layers=4, embed=1024, heads=8, mlp=4096, vocab=8192, batch=16,
                        length=512)
    cluster = a100_80gb(num_nodes=1)
    plan = plan_sharding(graph, cluster, 80 * GiB)
    assert plan.microbatches == 1
    # each extra microbatch adds a gradient accumulation and per-microbatch collectives
    times = [predict(graph, dataclasses.replace(plan, microbatches=m), cluster).step_s
             for m in (1, 2, 4)]
    assert times[0] < times[1] < times[2]


def test_exact_ties_between_microbatch_counts_go_to_the_fewest():
    # without a memory bandwidth a data-parallel plan's extra microbatches cost nothing
    graph = transformer(layers=2, embed=256, heads=8, mlp=1024, vocab=1024, batch=64,
                        length=128)
    cluster = dataclasses.replace(a100_80gb(num_nodes=1), memory_bandwidth=math.inf)
    plan = plan_sharding(graph, cluster, 80 * GiB)
    assert (plan.mesh_shape["data"], plan.microbatches) == (8, 1)
    times = [predict(graph, dataclasses.replace(plan, microbatches=m), cluster).step_s
             for m in (1, 2, 4)]
    assert times[0] == pytest.approx(times[1]) == pytest.approx(times[2])


def test_collective_latency_grows_with_the_participants():
    graph = transformer(layers=2, embed=1024, heads=8, mlp=4096, vocab=8192, batch=8,
                        length=128)
    cluster = a100_80gb(num_nodes=1)
    waiting = dataclasses.replace(cluster, latency_per_device=1e-3)
    extra = {}
    for spec in ("dp2+tp4", "dp8"):  # one all-reduce per parameter: over 2 or 8 devices
        plan = named_plan(spec, 8).bind(graph.params)
        extra[spec] = (predict(graph, plan, waiting).communication_s
                       - predict(graph, plan, cluster).communication_s)
    assert extra["dp8"] == pytest.approx(7e-3 * len(graph.params))
    assert 0 < extra["dp2+tp4"]  # tensor all-reduces over 4, gradients over 2


def test_replicas_pay_for_the_update_they_repeat_at_memory_bandwidth():
    graph = transformer(layers=2, embed=1024, heads=8, mlp=4096, vocab=8192, batch=8,
                        length=128)
    cluster = a100_80gb(num_nodes=1)
    slots = 2

    def streamed(spec, **knobs):
        plan = dataclasses.replace(Plan(mesh=spec), **knobs).bind(graph.params)
        seconds = sum(group_terms(g, plan, cluster).memory_s for g in graph.groups)
        return seconds * cluster.memory_bandwidth

    data = (("data", 8), ("fsdp", 1), ("tensor", 1))
    tensor = (("data", 1), ("fsdp", 1), ("tensor", 8))
    # every replica writes the whole gradient, then reads it and reads and writes parameters
    # and optimizer slots: (1 + 3 + 2 slots) x the parameter bytes
    assert streamed(data) == pytest.approx((4 + 2 * slots) * graph.param_bytes)
    assert streamed(tensor) < streamed(data) / 4  # tensor-parallel: one shard each
    # ZeRO-1 splits the update over the replicas; microbatches add accumulations (3 x grads)
    assert streamed(data, zero=1) == pytest.approx((1 + (3 + 2 * slots) / 8)
                                                   * graph.param_bytes)
    assert streamed(data, microbatches=2) == pytest.approx(
        streamed(data) + 4 * graph.param_bytes)
    free = dataclasses.replace(cluster, memory_bandwidth=math.inf)
    plan = Plan(mesh=data).bind(graph.params)
    assert predict(graph, plan, free).step_s < predict(graph, plan, cluster).step_s


def test_a_pipeline_piece_streams_each_microbatch_gradient_in_its_w_pass():
    graph = transformer(layers=2, embed=1024, heads=8, mlp=4096, vocab=8192, batch=8,
                        length=128)
    blocks = next(g for g in graph.groups if g.repeat > 1)
    cluster = a100_80gb(num_nodes=1)
    free = dataclasses.replace(cluster, memory_bandwidth=math.inf)
    plan = named_plan("fsdp2+tp4", 8).bind(graph.params)
    paid, unpaid = (piece_cost(blocks, plan, c, Options(), 0.0) for c in (cluster, free))
    streamed = group_terms(blocks, plan, cluster).microbatch_memory_s
    # what one more microbatch adds to a step: writing its gradient, adding it into the sum
    one, two = (group_terms(blocks, dataclasses.replace(plan, microbatches=m), cluster).memory_s
                for m in (1, 2))
    assert streamed == pytest.approx(two - one) and streamed > 0
    assert (paid.f, paid.b) == (unpaid.f, unpaid.b)
    assert paid.w == pytest.approx(unpaid.w + streamed)


def test_collectives_are_costed_on_their_own_kinds_figures():
    graph = transformer(layers=2, embed=1024, heads=8, mlp=4096, vocab=8192, batch=8,
                        length=128)
    cluster = a100_80gb(num_nodes=1)
    slow = {"bandwidth": cluster.intra_node_bandwidth / 4, "latency": cluster.intra_node_latency}
    slow_scatter = dataclasses.replace(cluster, intra_node_collectives={"reduce-scatter": slow})
    for spec, scatters in (("dp8", False), ("fsdp8", True), ("tp8", False)):
        plan = named_plan(spec, 8).bind(graph.params)
        base, slowed = (predict(graph, plan, c) for c in (cluster, slow_scatter))
        assert (slowed.communication_s > base.communication_s) == scatters, spec
        assert slowed.collective_bytes == base.collective_bytes


def test_merged_collectives_pay_one_latency_per_layer_and_microbatch():
    """fsdp8: a layer's gradients reduce-scattered pay one latency each, all-reduced on a
    cluster that merges all-reduces one in all (twice the bytes); with nothing merged,
    all-reduce never wins and the search does not price it."""
    graph = transformer(layers=4, embed=1024, heads=8, mlp=4096, vocab=8192, batch=16,
                        length=512)
    stack = next(g for g in graph.groups if g.name == "blocks")
    plan = Plan(mesh=(("fsdp", 8),), microbatches=2)
    sharded = sum("embed" in p.logical_axes for p in stack.params)
    assert sharded > 1
    _, latency = MERGES_ALL_REDUCES.link(8, 1)
    scattered = group_terms(stack, plan, MERGES_ALL_REDUCES)
    reduced = group_terms(stack, dataclasses.replace(plan, grad_reduce="all-reduce"),
                          MERGES_ALL_REDUCES)
    layers_times_m = 4 * 2
    assert scattered.latency_s - reduced.latency_s == pytest.approx(
        (sharded - 1) * layers_times_m * latency)
    assert reduced.collective_bytes["all-reduce"] == pytest.approx(
        8 * scattered.collective_bytes["reduce-scatter"])
    assert grad_reductions(plan, MERGES_ALL_REDUCES) == GRAD_REDUCE
    assert grad_reductions(plan, a100_80gb(num_nodes=1)) == ("reduce-scatter",)
    assert grad_reductions(Plan(mesh=(("data", 8),)), MERGES_ALL_REDUCES) == ("reduce-scatter",)
    assert merging_grad_reduce(plan, MERGES_ALL_REDUCES) == "all-reduce"
    assert merging_grad_reduce(plan, a100_80gb(num_nodes=1)) == "reduce-scatter"
    assert describe(dataclasses.replace(plan, grad_reduce="all-reduce")) == (
        "fsdp8 m2 grads all-reduce")
