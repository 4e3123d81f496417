"""calibrate(): measured figures for the 8 simulated CPU devices, fits that predict the
timings they came from (collectives alone, and probe training steps), and a disk cache that
skips measuring on the second call."""

import dataclasses
import math
import time

import numpy as np
import pytest

import jaxpar
from jaxpar.cluster import calibration, probe
from jaxpar.cluster.calibration import KINDS, ring_factor
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.fit import TERMS, scaled


@pytest.fixture(scope="module")
def calibrated(calibration_cache):
    return (jaxpar.calibrate(cache_dir=calibration_cache), calibration_cache,
            calibration.load_measurements(cache_dir=calibration_cache))


def test_calibrated_cluster_describes_8_devices_in_one_node(calibrated):
    cluster, _, record = calibrated
    assert cluster.source == "calibrated"
    assert (cluster.num_nodes, cluster.devices_per_node) == (1, 8)
    isolated = Cluster(**record["isolated_cluster"])
    figures = [isolated.peak_flops, isolated.memory_bytes, isolated.intra_node_bandwidth,
               isolated.intra_node_latency, isolated.memory_bandwidth]
    assert all(math.isfinite(x) and x > 0 for x in figures)
    assert (cluster.inter_node_bandwidth, cluster.inter_node_latency) == (
        cluster.intra_node_bandwidth, cluster.intra_node_latency)
    # 8 devices share 2 cores: the per-device rate under full load is below the rate alone.
    assert isolated.peak_flops < max(rate for _, rate in record["matmul"]["single"])
    assert record["seconds"] < 600  # about 150 s on 2 cores
    # launching a jitted program costs the host microseconds, not nothing and not a step
    assert 1e-7 < cluster.dispatch_latency == isolated.dispatch_latency == record["dispatch"]
    assert cluster.dispatch_latency < 1e-2


def test_links_use_the_fit_over_all_kinds_scaled_to_the_probe_steps(calibrated):
    cluster, _, record = calibrated
    isolated = Cluster(**record["isolated_cluster"])
    fit = record["fits"]["all"]
    assert (isolated.intra_node_bandwidth, isolated.intra_node_latency,
            isolated.latency_per_device) == (fit["bandwidth"], fit["latency"],
                                             fit["latency_per_device"])
    assert isolated.memory_bandwidth == record["memory"]["all_devices"]
    scales = record["step_fit"]["scales"]
    assert dataclasses.replace(cluster, source="measured") == scaled(isolated, scales)
    # per-kind fits are measured, but a step does not follow them (docs/planner.md)
    assert set(record["fits"]) == {*KINDS, "all"} and not cluster.intra_node_collectives
    # a collective among 8 devices starts when the last of them arrives
    assert cluster.link(8, 1)[1] == pytest.approx(cluster.link(2, 1)[1]
                                                  + 6 * cluster.latency_per_device)


def test_every_mesh_shape_of_both_probes_was_timed(calibrated):
    _, _, record = calibrated
    plans = {(s["probe"], s["plan"]) for s in record["steps"]}
    # 10 meshes, and the 6 with a tensor axis again with two microbatches, per probe
    assert len(plans) == len(record["steps"]) == 2 * (10 + 6)
    assert {s["batch"] for s in record["steps"]} == {8, 16}
    # each median rests on SAMPLES steps on quiet cores (a disturbed step is taken again)
    assert all(s["clean"] >= probe.SAMPLES and len(s["samples"]) <= probe.MAX_SAMPLES
               and s["seconds"] > 0 for s in record["steps"])


def test_the_calibrated_cluster_predicts_the_probe_steps(calibrated):
    """The fitted terms come back from the cost model on the calibrated cluster, and they
    track the measured steps: within 15 % (median), and roughly in order on each probe
    (its fastest plans are within the steps' noise of each other)."""
    cluster, _, record = calibrated
    fit = record["step_fit"]
    steps = record["steps"]
    terms = probe.terms_of(steps, cluster)
    assert [sum(t.values()) for t in terms] == pytest.approx(fit["predicted_s"], rel=1e-9)
    assert [sum(t[k] for k in TERMS) for t in fit["terms"]] != pytest.approx(
        fit["predicted_s"], rel=0.05)  # the scales changed the isolated model's prediction
    assert fit["median_relative_error"] < 0.15
    assert set(fit["spearman"]) == set(probe.PROBES)
    # per probe >= 0.3, both together >= 0.5: on jax 0.12 with host memory kept
    # (jaxpar.host_memory) a CI run measured narrow 0.44, wide 0.80 (the narrow probe's
    # fastest plans are within the steps' noise of each other)
    assert min(fit["spearman"].values()) >= 0.3
    assert sum(fit["spearman"].values()) / len(fit["spearman"]) >= 0.5


def _median_relative_error(fit, points):
    predicted = np.array([fit["latency"] + (p["group"] - 1) * fit["latency_per_device"]
                          + ring_factor(p["kind"], p["group"]) * p["bytes"] / fit["bandwidth"]
                          for p in points])
    measured = np.array([p["seconds"] for p in points])
    return float(np.median(np.abs(predicted - measured) / measured))


@pytest.mark.parametrize("kind", [*KINDS, "all"])
def test_alpha_beta_fit_predicts_the_measured_collective_times(calibrated, kind):
    _, _, record = calibrated
    points = [p for p in record["collectives"] if kind in ("all", p["kind"])]
    assert {p["group"] for p in points} == {2, 4, 8}
    assert _median_relative_error(record["fits"][kind], points) < 0.5


def test_second_call_reads_the_cache_without_measuring(calibrated, monkeypatch):
    cluster, cache_dir, _ = calibrated

    def no_measuring(*args):
        raise AssertionError("calibrate measured although a cached calibration exists")

    monkeypatch.setattr(calibration, "_measure", no_measuring)
    start = time.perf_counter()
    assert jaxpar.calibrate(cache_dir=cache_dir) == cluster
    assert time.perf_counter() - start < 1.0


def test_refresh_measures_again(calibrated, monkeypatch, tmp_path):
    cluster, _, record = calibrated
    slowdowns = []

    def measure(devices, verbose):
        slowdowns.append(len(slowdowns) + 1)
        return {**record, "collectives": [{**p, "seconds": slowdowns[-1] * p["seconds"]}
                                          for p in record["collectives"]]}

    monkeypatch.setattr(calibration, "_measure", measure)
    assert jaxpar.calibrate(cache_dir=tmp_path) == cluster
    assert jaxpar.calibrate(cache_dir=tmp_path) == cluster and slowdowns == [1]
    refreshed = jaxpar.calibrate(cache_dir=tmp_path, refresh=True)
    assert slowdowns == [1, 2]
    # Every collective twice as slow alone: the isolated fit doubles the latency and halves
    # the bandwidth; the rest is measured as before, and the step fit runs on the new figures.
    before = Cluster(**record["isolated_cluster"])
    after_record = calibration.load_measurements(cache_dir=tmp_path)
    after = Cluster(**after_record["isolated_cluster"])
    assert after.intra_node_latency == pytest.approx(2 * before.intra_node_latency)
    assert after.intra_node_bandwidth == pytest.approx(before.intra_node_bandwidth / 2)
    assert after.latency_per_device == pytest.approx(2 * before.latency_per_device)
    assert (after.peak_flops, after.memory_bandwidth) == (before.peak_flops,
                                                          before.memory_bandwidth)
    assert dataclasses.replace(refreshed, source="measured") == scaled(
        after, after_record["step_fit"]["scales"])
    assert jaxpar.calibrate(cache_dir=tmp_path) == refreshed
