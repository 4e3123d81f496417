"""Random bits of a batch shard equal to its rows of the whole batch's bits.

A model's dropout draws one mask for its whole batch: `bernoulli(key, p, (batch, ...))`.
When a step runs each batch shard (and each microbatch) on its own, a shard's draw must be
its rows of the whole batch's mask, so that training does not depend on the data-parallel
degree or the microbatch count. With JAX's partitionable threefry (its default), element i
of a draw is threefry2x32(key, i) at its flat index i. A key of `SHARD_RNG`, the PRNG
implementation here, carries beside its threefry key the rows of the whole batch the shard
holds (first row, stride) and how many rows the shard has; its random bits are those at
the flat indices of those rows in the whole draw. Splits and fold-ins act on the threefry
key exactly as threefry's do, so every key the model derives keeps the rows. A draw whose
leading dimension is not the shard's rows (a mask broadcast over the batch) is drawn as on
one device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import define_prng_impl, threefry2x32_p

_KEY = 2  # threefry's key words; then first row, row stride and rows of the shard
_U32 = np.uint32


def _threefry(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(data[..., :_KEY], impl="threefry2x32")


def _with_rows(threefry_data: jax.Array, rows: jax.Array) -> jax.Array:
    """Threefry key data (..., 2) with the rows words (3,) appended to each key."""
    rows = jnp.broadcast_to(rows, (*threefry_data.shape[:-1], 3))
    return jnp.concatenate([threefry_data, rows], axis=-1)


def _mul_wide(a: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
    """(high, low) 32-bit words of the product of uint32 `a` and an integer `b` < 2**32."""
    a_lo, a_hi = a & _U32(0xFFFF), a >> _U32(16)
    b_lo, b_hi = _U32(b & 0xFFFF), _U32(b >> 16)
    p0, p1, p2, p3 = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (p0 >> _U32(16)) + (p1 & _U32(0xFFFF)) + (p2 & _U32(0xFFFF))
    low = (p0 & _U32(0xFFFF)) | (mid << _U32(16))
    high = p3 + (p1 >> _U32(16)) + (p2 >> _U32(16)) + (mid >> _U32(16))
    return high, low


def _random_bits(data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    if not shape:
        return jax.random.bits(_threefry(data), (), jnp.dtype(f"uint{bit_width}"))
    row_size = math.prod(shape[1:])
    if row_size >= 2**32:
        raise NotImplementedError(f"a random draw of shape {shape}: rows of 2**32 elements "
                                  "or more")
    first, stride, rows = data[_KEY], data[_KEY + 1], data[_KEY + 2]
    row = lax.broadcasted_iota(_U32, shape, 0)
    within = lax.broadcasted_iota(_U32, (1, row_size), 1).reshape((1, *shape[1:]))
    row = jnp.where(rows == _U32(shape[0]), first + row * stride, row)
    high, low = _mul_wide(row, row_size)
    low_sum = low + within
    high = high + (low_sum < low).astype(_U32)
    bits1, bits2 = threefry2x32_p.bind(data[0], data[1], high, low_sum)
    if bit_width == 64:
        return (bits1.astype(np.uint64) << np.uint64(32)) | bits2.astype(np.uint64)
    return (bits1 ^ bits2).astype(jnp.dtype(f"uint{bit_width}"))


def _seed(seed: jax.Array) -> jax.Array:
    data = jax.random.key_data(jax.random.key(seed))
    return jnp.concatenate([data, jnp.array([0, 1, 0], _U32)])


def _split(data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return _with_rows(jax.random.key_data(jax.random.split(_threefry(data), shape)),
                      data[_KEY:])


def _fold_in(data: jax.Array, value: int) -> jax.Array:
    return _with_rows(jax.random.key_data(jax.random.fold_in(_threefry(data), value)),
                      data[_KEY:])


SHARD_RNG = define_prng_impl(key_shape=(_KEY + 3,), seed=_seed, split=_split,
                             random_bits=_random_bits, fold_in=_fold_in,
                             name="threefry2x32_shard_rows", tag="fry_rows")


def shard_key(key: jax.Array, first_row: jax.Array, stride: int, rows: int) -> jax.Array:
    """A threefry `key` as a `SHARD_RNG` key of the shard holding rows first_row,
    first_row + stride, ... (`rows` of them) of the whole batch."""
    words = jnp.stack([jnp.asarray(first_row, _U32), _U32(stride), _U32(rows)])
    data = jax.random.key_data(key)
    return jax.random.wrap_key_data(_with_rows(data, words), impl=SHARD_RNG)


def is_threefry_key(x) -> bool:
    """Whether `x` is a typed key of JAX's threefry2x32 implementation."""
    threefry = jax.random.key(0, impl="threefry2x32").dtype
    return getattr(x, "dtype", None) == threefry  # arrays and their ShapeDtypeStructs
