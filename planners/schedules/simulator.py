"""Time a pipeline schedule: when each op runs, the step time, the bubble and the stash.

Each rank runs its ops in order; an op starts once its rank is free and its input is there:
F(mb, c) after F(mb, c - 1), B(mb, c) after B(mb, c + 1) (the last chunk: after F(mb, c)),
W(mb, c) after B(mb, c), plus the p2p time when the input comes from another rank. Op times
are per chunk; a schedule without W ops runs B + W as its backward.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from jaxpar.planners.schedules.generators import Op, Schedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Times = float | Sequence[float]


class Slot(NamedTuple):
    """One op as it ran: on its rank from `start` to `end` (a named tuple: a simulation makes
    one per op)."""

    op: Op
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class SimResult:
    """A simulated step: `timeline[r]` is rank r's slots in run order."""

    schedule: Schedule
    timeline: tuple[tuple[Slot, ...], ...]
    step_time: float
    bubble_fraction: float
    peak_stash: tuple[int, ...]

    @property
    def bubble_time(self) -> float:
        """Idle time of the average rank: bubble_fraction * step_time."""
        return self.bubble_fraction * self.step_time


def _per_chunk(name: str, times: Times, num_chunks: int, positive: bool) -> tuple[float, ...]:
    """One time per chunk; F and B must take time (> 0), W may be 0 (folded into B)."""
    per_chunk = (times,) * num_chunks if isinstance(times, int | float) else tuple(times)
    if len(per_chunk) != num_chunks:
        raise ValueError(f"{name} has {len(per_chunk)} per-chunk times but the schedule has "
                         f"{num_chunks} chunks (p * v): pass one time per chunk or a scalar")
    low = min(per_chunk)
    if low < 0 or (positive and low == 0):
        raise ValueError(f"{name} time {low} of a chunk: must be {'> 0' if positive else '>= 0'}")
    return tuple(float(t) for t in per_chunk)


def _dependency(op: Op, last_chunk: int) -> Op | None:
    """The op whose output `op` consumes (None for a first-chunk forward). Built as a plain
    tuple, which equals and hashes as the Op: the simulator asks this for every op."""
    kind, microbatch, chunk = op
    if kind == "F":
        return ("F", microbatch, chunk - 1) if chunk > 0 else None
    if kind == "B":
        return ("F", microbatch, chunk) if chunk == last_chunk else ("B", microbatch, chunk + 1)
    return ("B", microbatch, chunk)


def validate(schedule: Schedule) -> None:
    """Raise ValueError unless every F and B (and W, if the schedule splits backward) of every
    (microbatch, chunk) appears exactly once, on the rank holding its chunk."""
    s = schedule
    if len(s.ops) != s.p:
        raise ValueError(f"schedule {s.name!r} has op lists for {len(s.ops)} ranks; p={s.p}")
    kinds = "FBW" if s.splits_backward else "FB"
    expected = {Op(k, mb, c) for k in kinds for mb in range(s.m) for c in range(s.num_chunks)}
    for rank, rank_ops in enumerate(s.ops):
        for op in rank_ops:
            if op not in expected:
                raise ValueError(f"schedule {s.name!r}: rank {rank} runs {op}, which is not an op "
                                 f"of m={s.m} microbatches over {s.num_chunks} chunks "
                                 f"with kinds {'/'.join(kinds)}")
            if s.rank_of(op.chunk) != rank:
                raise ValueError(f"schedule {s.name!r}: {op} is on rank {rank} but chunk "
                                 f"{op.chunk} lives on rank {s.rank_of(op.chunk)} (chunk mod p)")
    seen = Counter(op for rank_ops in s.ops for op in rank_ops)
    repeated = sorted((str(op) for op, n in seen.items() if n > 1))
    missing = sorted(str(op) for op in expected if op not in seen)
    if repeated or missing:
        raise ValueError(f"schedule {s.name!r}: every op must run exactly once; "
                         f"repeated: {repeated[:5] or 'none'}, missing: {missing[:5] or 'none'}"
                         f" ({len(repeated)} repeated, {len(missing)} missing)")


# Schedules already validated: the planner simulates one schedule under several timings.
_VALID: weakref.WeakSet[Schedule] = weakref.WeakSet()


def simulate(schedule: Schedule, f: Times = 1.0, b: Times = 1.0, w: Times = 1.0,
             p2p: float = 0.0) -> SimResult:
    """Run `schedule` on per-chunk F / B / W times (scalars or one per chunk) and a p2p time.

    bubble_fraction = 1 - busy / (p * step_time); a forward's activations are stashed from its
    F until its B (until its W when the schedule splits backward). Raises ValueError if the
    schedule is invalid (see `validate`) or deadlocks, naming each stuck rank's op and input.
    """
    if schedule not in _VALID:
        validate(schedule)
        _VALID.add(schedule)
    s = schedule
    f_t, b_t, w_t = (_per_chunk(name, times, s.num_chunks, positive=name != "w")
                     for name, times in (("f", f), ("b", b), ("w", w)))
    if p2p < 0:
        raise ValueError(f"p2p={p2p}: a transfer time must be >= 0")
    split = s.splits_backward
    duration = {"F": f_t, "B": b_t if split else tuple(x + y for x, y in zip(b_t, w_t)), "W": w_t}
    last_chunk = s.num_chunks - 1

    done: dict[Op, float] = {}
    free = [0.0] * s.p
    position = [0] * s.p
    slots: list[list[Slot]] = [[] for _ in range(s.p)]
    progressed = True
    while progressed:
        progressed = False
        for rank, rank_ops in enumerate(s.ops):
            i, end, mine = position[rank], free[rank], slots[rank]
            while i < len(rank_ops):
                op = rank_ops[i]
                dep = _dependency(op, last_chunk)
                if dep is None:
                    ready = 0.0
                elif dep in done:
                    ready = done[dep] + (p2p if dep[2] % s.p != rank else 0.0)
                else:
                    break
                start = end if end > ready else ready
                end = start + duration[op.kind][op.chunk]
                mine.append(Slot(op, start, end))
                done[op] = end
                i += 1
            progressed |= i > position[rank]
            position[rank], free[rank] = i, end
    stuck = [(rank, rank_ops[position[rank]]) for rank, rank_ops in enumerate(s.ops)
             if position[rank] < len(rank_ops)]
    if stuck:
        waits = "; ".join(f"rank {rank} waits at {op} for {Op(*dep)} from rank "
                          f"{s.rank_of(dep[2])}"
                          for rank, op in stuck if (dep := _dependency(op, last_chunk)))
        raise ValueError(f"schedule {s.name!r} deadlocks: {waits}; reorder so that each op "
                         f"comes after the op it consumes")

    step_time = max(free)
    busy = sum(slot.end - slot.start for rank_slots in slots for slot in rank_slots)
    return SimResult(
        schedule=s,
        timeline=tuple(tuple(rank_slots) for rank_slots in slots),
        step_time=step_time,
        bubble_fraction=1.0 - busy / (s.p * step_time),
        peak_stash=tuple(peak_stash(rank_ops, split) for rank_ops in s.ops),
    )


def peak_stash(rank_ops: Sequence[Op], split_backward: bool) -> int:
    """Most (microbatch, chunk) activations held at once: +1 at F, -1 at B (at W if split)."""
    release = "W" if split_backward else "B"
    live = peak = 0
    for op in rank_ops:
        live += (op.kind == "F") - (op.kind == release)
        peak = max(peak, live)
    return peak


def timeline_text(result: SimResult, width: int = 100) -> str:
    """One row per rank over [0, step_time] in `width` columns: F as the microbatch mod 10,
    B as a lowercase letter (a = microbatch 0, mod 26), W as the uppercase letter, idle '.'."""
    if width < 1:
        raise ValueError(f"width={width}: must be >= 1 column")
    scale = width / result.step_time
    label = len(str(result.schedule.p - 1))
    rows = []
    for rank, rank_slots in enumerate(result.timeline):
        row = ["."] * width
        for slot in rank_slots:
            mb = slot.op.microbatch
            char = {"F": str(mb % 10), "B": chr(ord("a") + mb % 26),
                    "W": chr(ord("A") + mb % 26)}[slot.op.kind]
            for col in range(round(slot.start * scale), round(slot.end * scale)):
                row[col] = char
        rows.append(f"rank {rank:>{label}} |{''.join(row)}|")
    rows.append(f"1 column = {1 / scale:.3g} time units; step {result.step_time:.4g}, "
                f"bubble {result.bubble_fraction:.1%}; F 0-9, B a-z, W A-Z by microbatch, idle .")
    return "\n".join(rows)


_COLORS = {"F": "#4c72b0", "B": "#dd8452", "W": "#55a868"}


def gantt(result: SimResult, path: str | None = None) -> Figure:
    """A matplotlib Gantt chart of `result` (rank 0 on top, one bar per op, labelled with its
    microbatch; later chunks of a rank in lighter shades); saved as PNG when `path` is given."""
    from matplotlib.figure import Figure  # imported here: planning never pays for matplotlib
    from matplotlib.patches import Patch

    s = result.schedule
    fig = Figure(figsize=(min(24.0, 6.0 + 0.12 * max(map(len, s.ops))), 1.2 + 0.45 * s.p),
                 layout="constrained")
    ax = fig.add_subplot()
    min_label_width = result.step_time / 120
    for rank, rank_slots in enumerate(result.timeline):
        for slot in rank_slots:
            local = slot.op.chunk // s.p
            ax.barh(rank, slot.end - slot.start, left=slot.start, height=0.8,
                    color=_COLORS[slot.op.kind], alpha=1.0 - 0.5 * local / s.v,
                    edgecolor="white", linewidth=0.5)
            if slot.end - slot.start >= min_label_width:
                ax.text((slot.start + slot.end) / 2, rank, str(slot.op.microbatch),
                        ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(s.p), [f"rank {r}" for r in range(s.p)])
    ax.set_ylim(s.p - 0.5, -0.5)
    ax.set_xlim(0, result.step_time)
    ax.set_xlabel("time")
    kinds = ("F", "B", "W") if s.splits_backward else ("F", "B")
    handles = [Patch(color=_COLORS[k], label=k) for k in kinds]
    handles += [Patch(color="gray", alpha=1.0 - 0.5 * c / s.v, label=f"local chunk {c}")
                for c in range(s.v) if s.v > 1]
    ax.legend(handles=handles,
              loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(f"{s.name}: p={s.p} m={s.m} v={s.v}, step {result.step_time:.4g}, "
                 f"bubble {result.bubble_fraction:.1%}, peak stash {max(result.peak_stash)}")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
