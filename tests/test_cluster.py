"""Cluster presets and the local cluster: plain numbers the planners read."""

import jax
import pytest

import jaxpar
from jaxpar.planners import a100_80gb, h100_80gb, tpu_v4


def test_presets_carry_datasheet_figures():
    a100 = a100_80gb(num_nodes=128)
    assert a100.num_devices == 1024 and a100.peak_flops == 312e12
    assert h100_80gb().peak_flops > a100.peak_flops
    assert tpu_v4(64).devices_per_node == 64


def test_link_depends_on_whether_a_group_stays_in_a_node():
    cluster = a100_80gb(num_nodes=4)
    fast = (cluster.intra_node_bandwidth, cluster.intra_node_latency)
    slow = (cluster.inter_node_bandwidth, cluster.inter_node_latency)
    assert cluster.link(group_size=8, stride=1) == fast     # tensor axis inside a node
    assert cluster.link(group_size=4, stride=8) == slow     # data axis across nodes
    assert cluster.link(group_size=2, stride=4) == fast     # devices 0 and 4 share a node


def test_local_cluster_describes_the_simulated_cpu_devices():
    cluster = jaxpar.local_cluster()
    assert cluster.num_devices == len(jax.devices()) == 8
    assert cluster.num_nodes == 1 and cluster.memory_bytes > 0


def test_invalid_cluster_is_rejected():
    with pytest.raises(ValueError, match="num_nodes must be positive"):
        a100_80gb(num_nodes=0)
