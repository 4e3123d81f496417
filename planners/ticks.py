"""The tick table of a synchronous SPMD pipeline: what every rank does in each tick.

The SPMD runtime (`jaxpar.spmd`) steps all ranks together. In a tick each rank runs at most
one op of its schedule; then every rank sends the activation it produced to the next rank and
the gradient to the previous one (one cyclic shift each way: with interleaving, rank p - 1
sends chunk c's output to rank 0, which holds chunk c + 1). An op runs in the first tick after
its input was produced, in its rank's order: the schedule timed by `simulator.simulate` with
unit op times and no transfer time. The table's length is the program's trip count.

Received tensors wait in per-rank buffers: an activation from its arrival until the backward
of the chunk it feeds (the backward recomputes the chunk forward from it), a gradient from its
arrival until that backward (until W when the schedule splits the backward). Slots are
assigned by lifetime (interval colouring, which is optimal), so a buffer holds the schedule's
peak number of live tensors on its busiest rank, not m * v. Chunk 0's input is the batch
itself (the program re-embeds it in the backward), so it takes no slot.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import defaultdict

from jaxpar.planners.schedules import Op, Schedule
from jaxpar.planners.simulator import simulate

# A buffered tensor: ("x", microbatch, chunk) is the input activation of that chunk,
# ("g", microbatch, chunk) the gradient of its output.
Key = tuple[str, int, int]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One rank in one tick: its `op` (None: idle), the slots the op reads (`stash`: its input
    activation, `grad`: its output's gradient) and the slots the activation and gradient
    arriving at the end of the tick are written to; -1 where there is none."""

    op: Op | None = None
    stash: int = -1
    grad: int = -1
    recv_stash: int = -1
    recv_grad: int = -1


@dataclasses.dataclass(frozen=True)
class TickTable:
    """`cells[t][r]`: rank r in tick t. Each rank has `stash_slots` activation and
    `grad_slots` gradient slots (the most any rank needs)."""

    schedule: Schedule
    cells: tuple[tuple[Cell, ...], ...]
    stash_slots: int
    grad_slots: int

    @property
    def length(self) -> int:
        """Ticks in the program: the schedule's length in lock-step."""
        return len(self.cells)


def _release(op: Op, split_backward: bool) -> bool:
    """Whether `op` is the last to read its chunk's buffered tensors."""
    return op.kind == ("W" if split_backward else "B")


def _message(schedule: Schedule, op: Op | None) -> tuple[Key, int] | None:
    """What `op` sends when it is done: (the buffered tensor, receiving rank), if anything."""
    if op is not None and op.kind == "F" and op.chunk < schedule.num_chunks - 1:
        return ("x", op.microbatch, op.chunk + 1), schedule.rank_of(op.chunk + 1)
    if op is not None and op.kind == "B" and op.chunk > 0:
        return ("g", op.microbatch, op.chunk - 1), schedule.rank_of(op.chunk - 1)
    return None


def _reads(schedule: Schedule, op: Op) -> tuple[Key | None, Key | None]:
    """The buffered activation and gradient `op` reads."""
    stash = ("x", op.microbatch, op.chunk) if op.chunk > 0 else None
    if op.kind == "F":
        return stash, None
    grad = ("g", op.microbatch, op.chunk) if op.chunk < schedule.num_chunks - 1 else None
    return stash, grad


def _colour(lifetimes: dict[Key, tuple[int, int]]) -> tuple[dict[Key, int], int]:
    """Slots for tensors alive from the end of tick `arrive` until read in tick `release`:
    greedy by arrival, reusing the lowest slot freed by then. Returns slots and their count."""
    slot: dict[Key, int] = {}
    busy: list[tuple[int, int]] = []  # (release tick, slot)
    free: list[int] = []
    used = 0
    for key, (arrive, release) in sorted(lifetimes.items(), key=lambda kv: kv[1]):
        while busy and busy[0][0] <= arrive:
            heapq.heappush(free, heapq.heappop(busy)[1])
        if free:
            slot[key] = heapq.heappop(free)
        else:
            slot[key], used = used, used + 1
        heapq.heappush(busy, (release, slot[key]))
    return slot, used


def tick_table(schedule: Schedule) -> TickTable:
    """Run `schedule` in lock-step ticks and assign its buffer slots (see the module doc)."""
    split = schedule.splits_backward
    timed = simulate(schedule, f=1.0, b=1.0, w=1.0 if split else 0.0)
    tick = {slot.op: int(slot.start) for rank_slots in timed.timeline for slot in rank_slots}
    length = max(tick.values()) + 1

    arrive: dict[Key, tuple[int, int]] = {}  # key -> (tick, rank)
    for op, t in tick.items():
        if sent := _message(schedule, op):
            arrive[sent[0]] = (t, sent[1])
    lifetimes: dict[tuple[int, str], dict[Key, tuple[int, int]]] = defaultdict(dict)
    for op, t in tick.items():
        if _release(op, split):
            for key in filter(None, _reads(schedule, op)):
                lifetimes[arrive[key][1], key[0]][key] = (arrive[key][0], t)
    slot: dict[Key, int] = {}
    count = {"x": 0, "g": 0}
    for (_, kind), spans in lifetimes.items():
        slots, used = _colour(spans)
        slot.update(slots)
        count[kind] = max(count[kind], used)

    cells = [[Cell() for _ in range(schedule.p)] for _ in range(length)]
    for op, t in tick.items():
        rank = schedule.rank_of(op.chunk)
        stash, grad = _reads(schedule, op)
        cells[t][rank] = dataclasses.replace(cells[t][rank], op=op, stash=slot.get(stash, -1),
                                             grad=slot.get(grad, -1))
    for key, (t, rank) in arrive.items():
        field = "recv_stash" if key[0] == "x" else "recv_grad"
        cells[t][rank] = dataclasses.replace(cells[t][rank], **{field: slot[key]})
    return TickTable(schedule, tuple(map(tuple, cells)), count["x"], count["g"])


def check(table: TickTable) -> None:
    """Raise ValueError unless the table runs every op of its schedule exactly once, each rank
    in its schedule's order, every op reads from its slots the tensors it needs, and every
    arrival lands in a free slot (and only arrivals are written)."""
    s = table.schedule
    for r in range(s.p):
        ran = tuple(row[r].op for row in table.cells if row[r].op)
        if ran != s.ops[r]:
            raise ValueError(f"rank {r} runs {len(ran)} ops, not its schedule's "
                             f"{len(s.ops[r])} in order")
    held: list[dict[tuple[str, int], Key]] = [{} for _ in range(s.p)]
    for t, row in enumerate(table.cells):
        for r, cell in enumerate(row):
            for kind, key, index in zip("xg", _reads(s, cell.op) if cell.op else (None, None),
                                        (cell.stash, cell.grad)):
                if key is not None and held[r].get((kind, index)) != key:
                    raise ValueError(f"tick {t}, rank {r}: {cell.op} reads {kind} slot {index} "
                                     f"holding {held[r].get((kind, index))}, not {key}")
                if key is not None and _release(cell.op, s.splits_backward):
                    del held[r][kind, index]
        arriving = {(dst, key[0]): key for key, dst in filter(None, (
            _message(s, cell.op) for cell in row))}
        for r, cell in enumerate(row):
            for kind, index in (("x", cell.recv_stash), ("g", cell.recv_grad)):
                key = arriving.get((r, kind))
                if (index >= 0) != (key is not None) or (kind, index) in held[r]:
                    raise ValueError(f"tick {t}, rank {r}: {key or 'nothing'} arrives in "
                                     f"{kind} slot {index} holding {held[r].get((kind, index))}")
                if key is not None:
                    held[r][kind, index] = key
