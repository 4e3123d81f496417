"""Smoke test of scripts/bench_peers.py --quick: it runs, its peers compute jaxpar's step,
and its JSON has every field with sane values. The targets (at most 1.0x the hand-written
program and MaxText) are judged on the full runs in docs/bench_peers.md: a few steps of a
tiny model on shared cores are noise."""

import math

import pytest

pytestmark = pytest.mark.xdist_group("bench_peers")  # its module fixture runs once


@pytest.fixture(scope="module")
def result(quick_bench) -> dict:
    return quick_bench("bench_peers.py")


def test_the_hand_written_peer_computes_the_same_step(result):
    (case,) = result["cases"]
    assert [r["plan"] for r in case["plans"]] == ["dp8", "fsdp8"]
    for r in case["plans"]:
        ours, hand = r["peers"]["jaxpar"], r["peers"]["hand-written"]
        assert len(ours["losses"]) == 2 and r["loss_max_rel_diff"] < 1e-5
        assert r["over_hand-written"] == pytest.approx(ours["median_s"] / hand["median_s"])
        assert r["lower_over_hand-written"] == pytest.approx(ours["lower_s"] / hand["lower_s"])
    assert result["targets"]["same_losses_as_handwritten"]


def test_every_peer_has_times_memory_and_mfu(result):
    (case,) = result["cases"]
    peak = result["meta"]["peak_flops_per_device"]
    assert peak > 0 and result["meta"]["peak_source"] == "calibrated matmul rate"
    for r in case["plans"]:
        for name in ("jaxpar", "hand-written"):
            p = r["peers"][name]
            assert p["steps"] == 2 and p["lower_s"] > 0 and p["compile_s"] > 0
            assert p["memory"]["argument"] > 0 and p["memory"]["temp"] > 0
            assert p["mfu"] == pytest.approx(
                case["model_flops_per_step"] / (p["median_s"] * 8 * peak))


def test_maxtext_runs_or_says_how_to_set_it_up(result):
    """Where MaxText's venv exists with this jax, it trains the same-sized GPT (finite,
    falling losses); elsewhere every MaxText row says why it was skipped."""
    (case,) = result["cases"]
    for r in case["plans"]:
        theirs = r["peers"]["maxtext"]
        if result["meta"]["maxtext"] == "run":
            assert all(map(math.isfinite, theirs["losses"]))
            assert theirs["losses"][-1] < theirs["losses"][0] and theirs["median_s"] > 0
        else:
            assert theirs == {"skipped": result["meta"]["maxtext"]}
            assert "maxtext_setup.sh" in theirs["skipped"] or "jax" in theirs["skipped"]
