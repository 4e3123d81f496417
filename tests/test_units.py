"""Memory figures print in the unit that fits their size, in errors and in explain().
Pure planning: no jax, no devices."""

import math

import pytest
from test_search import every_plan, transformer

from jaxpar.plan import PlanError
from jaxpar.planners.cluster import a100_80gb
from jaxpar.planners.cost import predict
from jaxpar.planners.sharding.search import plan_sharding
from jaxpar.planners.units import format_bytes
from jaxpar.predicted import Alternative, runners_up

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1, "1 B"), (512, "512 B"), (1023, "1023 B"),
    (1023.6, "1.00 KiB"),  # 1024 B would read as a figure of the next unit
    (KiB, "1.00 KiB"), (1.5 * KiB, "1.50 KiB"), (461 * KiB, "461.00 KiB"),
    (0.45 * MiB, "460.80 KiB"), (MiB - 6 * KiB / 1000, "1023.99 KiB"), (MiB - 1, "1.00 MiB"),
    (MiB, "1.00 MiB"), (GiB - 1, "1.00 GiB"), (1.5 * GiB, "1.50 GiB"), (80e9, "74.51 GiB"),
    (TiB, "1.00 TiB"), (2048 * TiB, "2048.00 TiB"),
])
def test_format_bytes_picks_the_largest_unit_that_reads_at_least_one(n, text):
    assert format_bytes(n) == text


def tiny():
    return transformer(layers=2, embed=64, heads=4, mlp=256, vocab=512, batch=8, length=16)


def test_a_sub_gib_budget_error_prints_the_smallest_memory_in_its_unit():
    graph, cluster = tiny(), a100_80gb(num_nodes=1)
    least = min(predict(graph, plan, cluster).total_bytes for plan in every_plan(graph, cluster))
    budget = least / 2
    assert least < MiB  # the figure the old message printed as 0.00 GiB
    with pytest.raises(PlanError) as err:
        plan_sharding(graph, cluster, budget)
    message = str(err.value)
    assert f"the smallest needs {format_bytes(least)} per device" in message
    assert (f"the budget is {format_bytes(budget)}; raise the budget to "
            f"{format_bytes(least)}") in message
    assert format_bytes(least).endswith(" KiB") and "GiB" not in message


def test_explain_of_a_small_plan_prints_each_memory_figure_in_its_unit():
    plan = plan_sharding(tiny(), a100_80gb(num_nodes=1), GiB)
    text = plan.explain()
    assert "0.00 GiB" not in text and "GiB" not in text
    assert f"{format_bytes(plan.predicted.total_bytes)} per device" in text.splitlines()[0]
    header, *rows = text.splitlines()[1:]
    assert "memory" in header
    assert len(rows) == len(plan.alternatives) > 0
    for row, alt in zip(rows, plan.alternatives):
        assert f"  {format_bytes(alt.memory_bytes)}  {alt.reason}" in row
    assert "GiB" not in plan.summary()


def test_a_runner_up_without_a_memory_figure_shows_a_dash():
    (row,) = runners_up([Alternative("dp8", math.nan, math.nan, "no layout fits 1.00 KiB")],
                        "ms")[1:]
    assert row.split()[1:4] == ["nan", "-", "no"]
