"""Smoke test of scripts/bench_planner.py --quick: it runs, and its JSON has every field with
sane values. The targets themselves (pick within 10 % of the best, rank correlation >= 0.8)
are judged on the full run in docs/bench_planner.md, not here: three steps of a tiny model
on shared cores are noise."""

import math

import pytest

pytestmark = pytest.mark.xdist_group("bench_planner")  # its module fixture runs once


@pytest.fixture(scope="module")
def result(quick_bench) -> dict:
    return quick_bench("bench_planner.py")


def test_sweep_fields(result):
    (case,) = result["sweep"]
    programs = [c for c in case["sweep"] if not c["control"]]
    assert case["configs"] == len(programs) == len(case["sweep"]) - 1 >= 4
    assert sum(c["is_pick"] for c in programs) == 1
    assert case["control_over_pick"] > 0
    assert case["ratio"] >= 1.0
    assert case["pick_measured_s"] >= case["best_measured_s"] > 0
    assert -1.0 <= case["spearman"] <= 1.0
    for c in case["sweep"]:
        assert c["samples"] >= 3
        assert c["predicted_s"] > 0 and c["measured_median_s"] > 0
        assert c["measured_iqr_rel"] >= 0
        assert math.prod(c["mesh"].values()) == 8
        assert abs(c["memory"]["argument_error"]) < 0.05  # params + optimizer + batch


def test_planning_time_recorded(result):
    (entry,) = [e for e in result["planning"] if e["devices"] == 1024]
    assert 0 < entry["plan_process_s"] and 0 < entry["trace_wall_s"]
    assert entry["plan"] and entry["predicted_step_s"] > 0
    assert result["targets"]["plan_175b_1024_process_s"] == pytest.approx(
        entry["total_process_s"])


def test_megatron_rows(result):
    (row,) = result["megatron"]["rows"]
    assert row["model"] == "1.7B" and row["gpus"] == 32 and row["global_batch"] == 512
    assert set(row["plans"]) == {"planner", "dp", "fsdp", "tp", "paper (t, d)"}
    peak = 312 * result["megatron"]["options"]["efficiency"]
    for p in row["plans"].values():
        assert 0 < p["model_tflops"] <= p["hardware_tflops"] <= peak * 1.001
    assert row["plans"]["paper (t, d)"]["remat"] == "full"
    assert row["plans"]["planner"]["fits"]
    fitting = [p["step_s"] for p in row["plans"].values() if p["fits"]]
    assert row["plans"]["planner"]["step_s"] <= min(fitting) * 1.001


def test_the_sweep_runs_on_the_step_fitted_cluster(result):
    meta = result["meta"]
    assert meta["cpu_cluster"]["source"] == "calibrated"
    fit = meta["cpu_calibration"]
    assert set(fit["scales"]) == {"compute", "latency", "transfer", "memory"}
    # the sweep's cluster is the isolated one with the fitted scales
    isolated = fit["isolated_cluster"]
    assert meta["cpu_cluster"]["peak_flops"] == pytest.approx(
        isolated["peak_flops"] / fit["scales"]["compute"])
