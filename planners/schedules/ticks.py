"""The tick table of a synchronous SPMD pipeline: what every rank does in each tick.

The SPMD runtime (`jaxpar.emit.spmd`) steps all ranks together. In a tick each rank runs at most
one op of its schedule; then every rank sends the activation it produced to the next rank and
the gradient to the previous one (one cyclic shift each way: with interleaving, rank p - 1
sends chunk c's output to rank 0, which holds chunk c + 1). An op runs in the first tick after
its input was produced, in its rank's order: the schedule timed by `simulate` with unit op
times and no transfer time. The table's length is the program's trip count.

Tensors wait in per-rank buffers, one per kind:

- `x`, a chunk's input activation, from its arrival until the chunk's F;
- `r`, the residuals F saves for the backward, from F until B (until W when the schedule
  splits the backward);
- `g`, the gradient of a chunk's output, from its arrival (for the last chunk: from its own
  F, which runs the loss head) until B (W);
- `h`, what B hands W when the backward splits, from B until W.

Slots are assigned by lifetime (interval colouring, which is optimal), so a buffer holds its
busiest rank's peak number of live tensors, not m * v: for `r`, the schedule's stash (p on
1F1B's rank 0, m for GPipe). A slot freed by a read in tick t takes a tensor written at the
end of tick t.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import defaultdict
from collections.abc import Sequence

from jaxpar.planners.schedules.generators import Op, Schedule
from jaxpar.planners.schedules.simulator import simulate

KINDS = "xrgh"

# A buffered tensor: (kind, microbatch, chunk).
Key = tuple[str, int, int]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One rank in one tick: its `op` (None: idle); the slots it uses, -1 where none: `x` (F
    reads its input), `r` (F writes its residuals, B and W read them), `g` (B and W read the
    output gradient, the last chunk's F writes it), `h` (B writes the handoff, W reads it);
    and the slots the activation and gradient arriving at the end of the tick go to."""

    op: Op | None = None
    x: int = -1
    r: int = -1
    g: int = -1
    h: int = -1
    recv_x: int = -1
    recv_g: int = -1


@dataclasses.dataclass(frozen=True)
class TickTable:
    """`cells[t][r]`: rank r in tick t. `slots[kind]`: the slots every rank has of a buffer
    (the most any rank needs)."""

    schedule: Schedule
    cells: tuple[tuple[Cell, ...], ...]
    slots: dict[str, int]

    @property
    def length(self) -> int:
        """Ticks in the program: the schedule's length in lock-step."""
        return len(self.cells)


def _uses(schedule: Schedule, op: Op) -> dict[str, tuple[Key, bool]]:
    """The buffered tensors `op` touches: kind -> (key, True if `op` writes it)."""
    mb, c = op.microbatch, op.chunk
    last = c == schedule.num_chunks - 1
    key = {kind: (kind, mb, c) for kind in KINDS}
    if op.kind == "F":
        uses = {"r": (key["r"], True)}
        if c > 0:
            uses["x"] = (key["x"], False)
        if last:
            uses["g"] = (key["g"], True)
        return uses
    uses = {"r": (key["r"], False), "g": (key["g"], False)}
    if schedule.splits_backward:
        uses["h"] = (key["h"], op.kind == "B")
    return uses


def _releases(schedule: Schedule, op: Op, kind: str) -> bool:
    """Whether `op` is the last to read its tensor of `kind`."""
    if kind == "x":
        return op.kind == "F"
    return op.kind == ("W" if schedule.splits_backward else "B") and kind in "rgh"


def _message(schedule: Schedule, op: Op | None) -> tuple[Key, int] | None:
    """What `op` sends when it is done: (the buffered tensor, receiving rank), if anything."""
    if op is not None and op.kind == "F" and op.chunk < schedule.num_chunks - 1:
        return ("x", op.microbatch, op.chunk + 1), schedule.rank_of(op.chunk + 1)
    if op is not None and op.kind == "B" and op.chunk > 0:
        return ("g", op.microbatch, op.chunk - 1), schedule.rank_of(op.chunk - 1)
    return None


def _colour(lifetimes: dict[Key, tuple[int, int]]) -> tuple[dict[Key, int], int]:
    """Slots for tensors written at the end of tick `start` and last read in tick `end`:
    greedy by start, reusing the lowest slot freed by then. Returns slots and their count."""
    slot: dict[Key, int] = {}
    busy: list[tuple[int, int]] = []  # (end tick, slot)
    free: list[int] = []
    used = 0
    for key, (start, end) in sorted(lifetimes.items(), key=lambda kv: kv[1]):
        while busy and busy[0][0] <= start:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            slot[key] = heapq.heappop(free)
        else:
            slot[key], used = used, used + 1
        heapq.heappush(busy, (end, slot[key]))
    return slot, used


def ticks_of(schedule: Schedule) -> dict[Op, int]:
    """The tick each op runs in, in lock-step: `simulate` with unit op times."""
    timed = simulate(schedule, f=1.0, b=1.0, w=1.0 if schedule.splits_backward else 0.0)
    return {slot.op: int(slot.start) for rank_slots in timed.timeline for slot in rank_slots}


def lockstep_time(schedule: Schedule, f: Sequence[float], b: Sequence[float],
                  w: Sequence[float], shift: float) -> float:
    """Seconds of the SPMD program on per-chunk op times: every tick lasts as long as its
    slowest rank's op, then both cyclic shifts run (`shift` seconds each, every tick). A
    schedule without W ops runs B + W as its backward."""
    split = schedule.splits_backward
    ticks = ticks_of(schedule)
    longest = [0.0] * (max(ticks.values()) + 1)
    for op, t in ticks.items():
        c = op.chunk
        seconds = {"F": f[c], "B": b[c] if split else b[c] + w[c], "W": w[c]}[op.kind]
        longest[t] = max(longest[t], seconds)
    return sum(longest) + 2 * shift * len(longest)


def tick_table(schedule: Schedule) -> TickTable:
    """Run `schedule` in lock-step ticks and assign its buffer slots (see the module doc)."""
    tick = ticks_of(schedule)
    length = max(tick.values()) + 1

    start: dict[Key, int] = {}
    for op, t in tick.items():
        if sent := _message(schedule, op):
            start[sent[0]] = t
        for key, writes in _uses(schedule, op).values():
            if writes:
                start[key] = t
    lifetimes: dict[tuple[int, str], dict[Key, tuple[int, int]]] = defaultdict(dict)
    for op, t in tick.items():
        for kind, (key, _) in _uses(schedule, op).items():
            if _releases(schedule, op, kind):
                lifetimes[schedule.rank_of(op.chunk), kind][key] = (start[key], t)
    slot: dict[Key, int] = {}
    slots = dict.fromkeys(KINDS, 0)
    for (_, kind), spans in lifetimes.items():
        assigned, used = _colour(spans)
        slot.update(assigned)
        slots[kind] = max(slots[kind], used)

    cells = [[Cell() for _ in range(schedule.p)] for _ in range(length)]
    for op, t in tick.items():
        rank = schedule.rank_of(op.chunk)
        used = {kind: slot[key] for kind, (key, _) in _uses(schedule, op).items()}
        cells[t][rank] = dataclasses.replace(cells[t][rank], op=op, **used)
    for op, t in tick.items():
        if sent := _message(schedule, op):
            key, rank = sent
            cells[t][rank] = dataclasses.replace(cells[t][rank], **{f"recv_{key[0]}": slot[key]})
    return TickTable(schedule, tuple(map(tuple, cells)), slots)


def check(table: TickTable) -> None:
    """Raise ValueError unless the table runs every op of its schedule exactly once, each rank
    in its schedule's order, every op reads from its slots the tensors it needs, and every
    write (an op's own or an arrival) lands in a free slot."""
    s = table.schedule
    for r in range(s.p):
        ran = tuple(row[r].op for row in table.cells if row[r].op)
        if ran != s.ops[r]:
            raise ValueError(f"rank {r} runs {len(ran)} ops, not its schedule's "
                             f"{len(s.ops[r])} in order")
    held: list[dict[tuple[str, int], Key]] = [{} for _ in range(s.p)]
    for t, row in enumerate(table.cells):
        writes: list[tuple[int, str, int, Key | None]] = []
        for r, cell in enumerate(row):
            for kind, (key, is_write) in (_uses(s, cell.op) if cell.op else {}).items():
                index = getattr(cell, kind)
                if is_write:
                    writes.append((r, kind, index, key))
                    continue
                if held[r].get((kind, index)) != key:
                    raise ValueError(f"tick {t}, rank {r}: {cell.op} reads {kind} slot {index} "
                                     f"holding {held[r].get((kind, index))}, not {key}")
                if _releases(s, cell.op, kind):
                    del held[r][kind, index]
        arriving = {(dst, key[0]): key for key, dst in filter(None, (
            _message(s, cell.op) for cell in row))}
        for r, cell in enumerate(row):
            for kind in "xg":
                writes.append((r, kind, getattr(cell, f"recv_{kind}"), arriving.get((r, kind))))
        for r, kind, index, key in writes:
            if (index >= 0) != (key is not None) or (kind, index) in held[r]:
                raise ValueError(f"tick {t}, rank {r}: {key or 'nothing'} arrives in "
                                 f"{kind} slot {index} holding {held[r].get((kind, index))}")
            if key is not None:
                held[r][kind, index] = key
