"""Smoke test of scripts/bench_pipeline.py --quick: it runs, and its JSON has every field with
sane values. The wall-time target itself is judged on the full run (docs/bench_pipeline.md):
a tiny model's step is driver overhead, not pipeline work."""


import pytest

pytestmark = pytest.mark.xdist_group("bench_pipeline")  # its module fixture runs once


@pytest.fixture(scope="module")
def result(quick_bench) -> dict:
    return quick_bench("bench_pipeline.py")


def test_simulated_bubbles_follow_the_formulas(result):
    rows = {(r["p"], r["m"], r["v"], r["schedule"]): r for r in result["simulated"]}
    for p in (4, 8):
        for m in (8, 16, 32):
            flat = (p - 1) / (m + p - 1)
            assert rows[p, m, 1, "gpipe"]["bubble"] == pytest.approx(flat)
            assert rows[p, m, 1, "1f1b"]["bubble"] == pytest.approx(flat)
            assert rows[p, m, 1, "gpipe"]["peak_stash_rank0"] == m
            assert rows[p, m, 1, "1f1b"]["peak_stash_rank0"] == p
            assert rows[p, m, 1, "zero_bubble_h1"]["bubble"] < flat
            for v in (2, 4):
                assert rows[p, m, v, "interleaved_1f1b"]["bubble"] < flat


def test_measured_configs(result):
    configs = {c["name"]: c for c in result["measured"]["configs"]}
    assert "dp8" in configs
    pipelined = [c for c in configs.values() if c["form"]]
    assert {c["form"] for c in pipelined} == {"mpmd", "spmd"}
    for c in configs.values():
        assert c["median_s"] > 0 and c["steps"] >= 2 and c["compile_s"] > 0
    for c in pipelined:
        assert c["over_baseline"] == pytest.approx(
            c["median_s"] / configs[c["baseline"]]["median_s"])


def test_megatron_row(result):
    (row,) = result["megatron"]
    assert row["model"] == "1.7B" and row["gpus"] == 32 and row["plan_s"] < 10
    assert row["pick_step_s"] <= row["paper_step_s"] * (1 + 1e-9)
    for who in ("pick", "paper"):
        assert 0 < row[f"{who}_model_tflops"] <= row[f"{who}_hardware_tflops"] <= 312 * 1.001
