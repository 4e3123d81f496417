"""calibrate(): measured figures for the 8 simulated CPU devices, a fit that predicts the
timings it came from, and a disk cache that skips measuring on the second call."""

import math
import time

import numpy as np
import pytest

import jaxpar
from jaxpar import calibration
from jaxpar.calibration import KINDS, ring_factor


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    cluster = jaxpar.calibrate(cache_dir=cache_dir)
    return cluster, cache_dir, calibration.load_measurements(cache_dir=cache_dir)


def test_calibrated_cluster_describes_8_devices_in_one_node(calibrated):
    cluster, _, record = calibrated
    assert cluster.source == "calibrated"
    assert (cluster.num_nodes, cluster.devices_per_node) == (1, 8)
    figures = [cluster.peak_flops, cluster.memory_bytes, cluster.intra_node_bandwidth,
               cluster.intra_node_latency]
    assert all(math.isfinite(x) and x > 0 for x in figures)
    assert (cluster.inter_node_bandwidth, cluster.inter_node_latency) == (
        cluster.intra_node_bandwidth, cluster.intra_node_latency)
    # 8 devices share 2 cores: the per-device rate under full load is below the rate alone.
    assert cluster.peak_flops < max(rate for _, rate in record["matmul"]["single"])
    assert record["seconds"] < 60


def test_links_use_the_fit_over_all_kinds_and_the_rest_is_only_recorded(calibrated):
    cluster, _, record = calibrated
    fit = record["fits"]["all"]
    assert (cluster.intra_node_bandwidth, cluster.intra_node_latency,
            cluster.latency_per_device) == (fit["bandwidth"], fit["latency"],
                                            fit["latency_per_device"])
    # per-kind fits and the memory stream rate are measured, but a step does not follow them
    assert set(record["fits"]) == {*KINDS, "all"} and not cluster.intra_node_collectives
    assert math.isfinite(record["memory"]["all_devices"]) and record["memory"]["all_devices"] > 0
    assert cluster.memory_bandwidth == math.inf
    # a collective among 8 devices starts when the last of them arrives
    assert cluster.link(8, 1)[1] == pytest.approx(cluster.link(2, 1)[1]
                                                  + 6 * cluster.latency_per_device)


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
    # Every collective twice as slow: the fit doubles the latency and halves the bandwidth.
    assert refreshed.intra_node_latency == pytest.approx(2 * cluster.intra_node_latency)
    assert refreshed.intra_node_bandwidth == pytest.approx(cluster.intra_node_bandwidth / 2)
    assert refreshed.latency_per_device == pytest.approx(2 * cluster.latency_per_device)
    assert refreshed.peak_flops == cluster.peak_flops
    assert refreshed.memory_bandwidth == cluster.memory_bandwidth
    assert jaxpar.calibrate(cache_dir=tmp_path) == refreshed
