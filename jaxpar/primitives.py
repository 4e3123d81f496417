"""What jaxpar reads of JAX primitives' parameters, across the JAX versions it supports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def scan_arity(params: Mapping[str, Any]) -> tuple[int, int]:
    """(constants, carries) of a `scan` equation's inputs, which come first, in that order,
    before the scanned-over arrays. jax < 0.11 names the counts (`num_consts`,
    `num_carry`); later versions give the three input trees instead (`ft_in`)."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(consts), len(carry)
