"""Byte counts as people read them (no jax)."""

from __future__ import annotations

import math

BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit in which the figure is at least 1: "512 B",
    "461.00 KiB", "1.50 GiB" (whole bytes, else 2 decimals; a figure that would round to
    1024 moves up a unit: 1023.999 KiB reads "1.00 MiB")."""
    size, unit = abs(n), 0
    while unit < len(BINARY_UNITS) - 1 and round(size, 2 if unit else 0) >= 1024:
        size, unit = size / 1024, unit + 1
    value = math.copysign(size, n)
    return f"{value:.0f} B" if unit == 0 else f"{value:.2f} {BINARY_UNITS[unit]}"
