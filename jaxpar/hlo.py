"""Read collectives out of compiled HLO text, to check a plan against what XLA emitted."""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1,
          "pred": 1}
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (?P<type>.+?) (?P<kind>" + "|".join(KINDS)
                 + r")(?:-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    shapes: tuple[tuple[int, ...], ...]
    nbytes: int


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective op in `hlo_text` with its result shapes and bytes (async pairs
    counted once, at their start)."""
    found = []
    for line in hlo_text.splitlines():
        m = _OP.match(line)
        if m is None:
            continue
        shapes, nbytes = [], 0
        for arr in _ARRAY.finditer(m.group("type")):
            dims = tuple(int(d) for d in arr.group("dims").split(",") if d)
            shapes.append(dims)
            nbytes += math.prod(dims) * _BYTES.get(arr.group("dtype"), 4)
        found.append(Collective(m.group("kind"), tuple(shapes), nbytes))
    return found


def count(hlo_text: str) -> dict[str, int]:
    ops = collectives(hlo_text)
    return {kind: sum(op.kind == kind for op in ops) for kind in KINDS}
