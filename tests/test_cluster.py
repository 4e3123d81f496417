"""Cluster presets and the local cluster: plain numbers the planners read."""

import dataclasses

import jax
import pytest

import jaxpar
from jaxpar.cluster import devices as devices_module
from jaxpar.planners import a100_80gb, h100_80gb, tpu_v4, tpu_v5e


def test_presets_carry_datasheet_figures():
    a100 = a100_80gb(num_nodes=128)
    assert a100.num_devices == 1024 and a100.peak_flops == 312e12
    assert h100_80gb().peak_flops > a100.peak_flops
    assert tpu_v4(64).devices_per_node == 64
    assert [c.memory_bandwidth for c in (a100, h100_80gb(), tpu_v4(), tpu_v5e())] == [
        2.0e12, 3.35e12, 1.2e12, 8.2e11]


def test_link_depends_on_whether_a_group_stays_in_a_node():
    cluster = a100_80gb(num_nodes=4)
    fast = (cluster.intra_node_bandwidth, cluster.intra_node_latency)
    slow = (cluster.inter_node_bandwidth, cluster.inter_node_latency)
    assert cluster.link(group_size=8, stride=1) == fast     # tensor axis inside a node
    assert cluster.link(group_size=4, stride=8) == slow     # data axis across nodes
    assert cluster.link(group_size=2, stride=4) == fast     # devices 0 and 4 share a node


def test_a_kind_measured_on_its_own_uses_its_figures_inside_a_node_only():
    gather = {"bandwidth": 100e9, "latency": 7e-6}
    cluster = dataclasses.replace(a100_80gb(num_nodes=4), intra_node_collectives={
        "all-gather": gather})
    assert cluster.link(8, 1, "all-gather") == (100e9, 7e-6)
    assert cluster.link(8, 1, "all-reduce") == cluster.link(8, 1)  # no figures: the link's
    assert cluster.link(4, 8, "all-gather") == cluster.link(4, 8)  # across nodes: the NIC's


def test_local_cluster_describes_the_simulated_cpu_devices():
    cluster = jaxpar.local_cluster()
    assert cluster.num_devices == len(jax.devices()) == 8
    assert cluster.num_nodes == 1 and cluster.memory_bytes > 0


@pytest.mark.parametrize("kind, preset", [("NVIDIA A100-SXM4-80GB", a100_80gb(2)),
                                          ("TPU v4", tpu_v4(8))])
def test_local_cluster_of_a_known_accelerator_keeps_every_datasheet_field(kind, preset,
                                                                         monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Device:
        process_index: int
        device_kind: str = kind

    merged = ("all-reduce", "all-gather", "reduce-scatter")  # what XLA's GPU and TPU merge
    monkeypatch.setattr(devices_module, "combined_kinds", lambda devices: merged)
    devices = [Device(i // 8) for i in range(8 * preset.num_nodes)]
    cluster = jaxpar.local_cluster(devices)
    assert cluster == dataclasses.replace(preset, name=kind, combined_kinds=merged)
    assert cluster.memory_bandwidth == preset.memory_bandwidth < float("inf")


def test_invalid_cluster_is_rejected():
    with pytest.raises(ValueError, match="num_nodes must be positive"):
        a100_80gb(num_nodes=0)
    with pytest.raises(ValueError, match="unknown kinds"):
        dataclasses.replace(a100_80gb(), intra_node_collectives={"all_gather": {}})


def test_local_cluster_knows_which_collectives_the_compiler_merges():
    """Read off XLA: its CPU backend merges independent all-reduces, and no other kind."""
    assert jaxpar.local_cluster().combined_kinds == ("all-reduce",)
    with pytest.raises(ValueError, match="combined_kinds has unknown kinds"):
        dataclasses.replace(a100_80gb(), combined_kinds=("broadcast",))
