"""Planners: search algorithms and cost models over plain data. Never imports jax."""

from jaxpar.planners.cluster import PRESETS, Cluster, a100_80gb, h100_80gb, tpu_v4, tpu_v5e

__all__ = ["PRESETS", "Cluster", "a100_80gb", "h100_80gb", "tpu_v4", "tpu_v5e"]
