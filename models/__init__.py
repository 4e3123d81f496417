"""Reference Flax NNX models with logical-axis annotations, and their size presets."""

from jaxpar.models.presets import PRESETS, GPTConfig, preset

__all__ = ["PRESETS", "GPTConfig", "preset"]
