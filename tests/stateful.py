"""The block of the tests' models with state beside their parameters: a residual MLP with
batch normalisation (optional) and dropout, and classification batches for it."""

import jax
import numpy as np
from flax import nnx

import jaxpar

WIDTH, CLASSES = 32, 8


def kernel(axes):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)


class Block(nnx.Module):
    def __init__(self, rngs, norm: bool):
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, kernel_init=kernel(("embed", "mlp")),
                             use_bias=False, rngs=rngs)
        self.norm = nnx.BatchNorm(
            2 * WIDTH, rngs=rngs,
            scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("mlp",)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",))
        ) if norm else None
        self.drop = nnx.Dropout(0.25, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, kernel_init=kernel(("mlp", "embed")),
                               use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = jaxpar.constrain(self.up(x), ("batch", "mlp"))
        h = self.norm(h) if self.norm is not None else h
        return x + self.down(jaxpar.constrain(self.drop(jax.nn.relu(h)), ("batch", "mlp")))


def batches(batch: int, steps: int = 3):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(batch, WIDTH)).astype(np.float32),
             "y": rng.integers(0, CLASSES, batch).astype(np.int32)} for _ in range(steps)]
