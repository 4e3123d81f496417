"""Read collectives out of compiled HLO text, to check a plan against what XLA emitted."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8, "s8": 1, "u8": 1,
          "pred": 1}
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (?P<type>.+?) (?P<kind>" + "|".join(KINDS)
                 + r")(?:-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(?P<name>\S+) \(")
_WHILE = re.compile(r" while\(.* body=%(?P<body>[^,\s]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>\d+)"\}')


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


def collective_bytes_per_step(hlo_text: str, min_bytes: int = 0) -> dict[str, int]:
    """Bytes of the collectives' results per step by kind, from compiled HLO text, in the
    units of `Predicted.collective_bytes`. An op in the body of a while loop (the layer scan,
    the microbatch scan) runs the loop's known trip count times, nested loops multiplied;
    ops of at most `min_bytes` (scalars) are left out."""
    bodies: dict[str, list[str]] = {}
    entry = name = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            name = header.group("name")
            bodies[name] = []
            entry = name if line.startswith("ENTRY") else entry
        elif name is not None:
            bodies[name].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text()")
    total: Counter[str] = Counter()

    def visit(computation: str, times: int) -> None:
        for line in bodies[computation]:
            for op in collectives(line):
                if op.nbytes > min_bytes:
                    total[op.kind] += times * op.nbytes
            loop = _WHILE.search(line)
            if loop:
                trips = _TRIP_COUNT.search(line)
                if trips is None:
                    raise ValueError("a while loop without known_trip_count: the bytes per "
                                     f"step are unknown ({line.strip()[:200]})")
                visit(loop.group("body"), times * int(trips.group("n")))

    visit(entry, 1)
    return dict(total)
