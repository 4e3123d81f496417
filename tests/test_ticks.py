"""Tick tables of the SPMD pipeline: every op once, in order, reading the right buffered
tensors; lengths and buffer sizes as the schedules imply. Pure Python: no jax."""

import dataclasses
import itertools
import random

import pytest

from jaxpar.planners.schedules.generators import (
    Op,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zero_bubble_h1,
)
from jaxpar.planners.schedules.simulator import simulate
from jaxpar.planners.schedules.ticks import Cell, check, lockstep_time, tick_table

PS, MS = (2, 4, 8), (1, 2, 4, 8, 16)


def schedules():
    for p, m in itertools.product(PS, MS):
        yield gpipe(p, m)
        yield one_f_one_b(p, m)
        yield from (interleaved_1f1b(p, m, v) for v in (2, 4) if m % p == 0)
        if m >= p:
            yield zero_bubble_h1(p, m)


def test_every_table_runs_each_op_once_reading_what_it_needs():
    for s in schedules():
        table = tick_table(s)
        check(table)  # each rank's ops in order; every read finds its tensor in its slot
        assert all(len(row) == s.p for row in table.cells)
        timed = simulate(s, f=1, b=1, w=1 if s.splits_backward else 0)
        assert table.slots["r"] == max(timed.peak_stash), s.name  # residuals: the stash


@pytest.mark.parametrize("p, m, v", [(2, 4, 1), (4, 8, 1), (8, 4, 1), (4, 8, 2), (2, 8, 4)])
def test_lock_step_length_is_twice_the_ops_of_a_rank_plus_the_fill(p, m, v):
    """A rank runs 2 m v ops; the last rank starts p - 1 ticks late and the first rank ends
    p - 1 ticks after it: 2 (m v + p - 1) ticks, the bubble shrinking by v per chunk size."""
    make = (lambda: interleaved_1f1b(p, m, v)) if v > 1 else (lambda: one_f_one_b(p, m))
    assert tick_table(make()).length == 2 * (m * v + p - 1)
    if v == 1:
        assert tick_table(gpipe(p, m)).length == 2 * (m + p - 1)


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (8, 4), (4, 16)])
def test_buffers_hold_the_schedules_peak_not_every_microbatch(p, m):
    """GPipe stashes every microbatch's residuals, 1F1B at most p; an input waits one tick
    for its F. GPipe's last rank holds its m loss gradients until the backwards start, 1F1B's
    one. Interleaving holds fewer than its m v residual sets."""
    for s, stash, grads in ((gpipe(p, m), m, m), (one_f_one_b(p, m), min(p, m), 1)):
        slots = tick_table(s).slots
        assert (slots["r"], slots["x"], slots["g"], slots["h"]) == (stash, 1, grads, 0), s.name
    if m % p == 0:
        assert tick_table(interleaved_1f1b(p, m, 2)).slots["r"] < 2 * m
    if m >= p:  # ZB-H1 holds p handoffs between B and W on its busiest rank
        assert tick_table(zero_bubble_h1(p, m)).slots["h"] == p


def test_1f1b_two_ranks_by_hand():
    """p = 2, m = 2: rank 1 receives F(0)'s output in x slot 0 at the end of tick 0, runs F
    of the last chunk on it (keeping residuals and the loss gradient), then its B, and sends
    the gradient back for rank 0's B in tick 3."""
    table = tick_table(one_f_one_b(2, 2))
    rank0 = [cell.op for cell in (row[0] for row in table.cells)]
    rank1 = [cell.op for cell in (row[1] for row in table.cells)]
    assert rank0 == [Op("F", 0, 0), Op("F", 1, 0), None, Op("B", 0, 0), None, Op("B", 1, 0)]
    assert rank1 == [None, Op("F", 0, 1), Op("B", 0, 1), Op("F", 1, 1), Op("B", 1, 1), None]
    assert table.cells[0][0] == Cell(Op("F", 0, 0), r=0) and table.cells[0][1] == Cell(recv_x=0)
    assert table.cells[1][1] == Cell(Op("F", 0, 1), x=0, r=0, g=0, recv_x=0)
    assert table.cells[2][1] == Cell(Op("B", 0, 1), r=0, g=0)
    assert table.cells[2][0].recv_g == 0 and table.cells[3][0] == Cell(Op("B", 0, 0), r=0, g=0)


def edited(table, t, rank, **changes):
    cells = [list(row) for row in table.cells]
    cells[t][rank] = dataclasses.replace(cells[t][rank], **changes)
    return dataclasses.replace(table, cells=tuple(map(tuple, cells)))


def test_check_catches_a_clobbered_slot_a_stray_write_and_a_lost_op():
    table = tick_table(gpipe(2, 4))
    t = next(t for t, row in enumerate(table.cells) if row[0].op == Op("F", 1, 0))
    with pytest.raises(ValueError, match="arrives in r slot 0 holding"):  # microbatch 0's
        check(edited(table, t, 0, r=0))
    with pytest.raises(ValueError, match="nothing arrives in g slot 0"):
        check(edited(table, 0, 0, recv_g=0))
    with pytest.raises(ValueError, match="rank 0 runs 7 ops"):
        check(edited(table, 0, 0, op=None))


def test_lockstep_time_is_the_slowest_rank_per_tick_never_below_the_event_timing():
    rng = random.Random(0)
    for schedule in schedules():
        chunks = schedule.num_chunks
        f, b, w = ([rng.uniform(0.5, 2.0) for _ in range(chunks)] for _ in range(3))
        lockstep = lockstep_time(schedule, f, b, w, shift=0.0)
        assert lockstep >= simulate(schedule, f, b, w).step_time * (1 - 1e-12), schedule.name
        # equal op times: every tick lasts one op, plus two shifts
        table = tick_table(schedule)
        unit = lockstep_time(schedule, [1.0] * chunks, [1.0] * chunks,
                             [1.0 if schedule.splits_backward else 0.0] * chunks, shift=0.25)
        assert unit == pytest.approx(1.5 * table.length)
