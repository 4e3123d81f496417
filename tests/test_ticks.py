"""Tick tables of the SPMD pipeline: every op once, in order, reading the right buffered
tensors; lengths and buffer sizes as the schedules imply. Pure Python: no jax."""

import dataclasses
import itertools

import pytest

from jaxpar.planners.schedules import Op, gpipe, interleaved_1f1b, one_f_one_b, zero_bubble_h1
from jaxpar.planners.simulator import simulate
from jaxpar.planners.ticks import Cell, check, tick_table

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
        assert table.stash_slots <= max(simulate(s).peak_stash), s.name


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
    """GPipe stashes every microbatch, 1F1B at most p; one gradient slot suffices for both.
    Interleaving holds fewer than its m v chunk inputs."""
    for s, stash in ((gpipe(p, m), m), (one_f_one_b(p, m), min(p, m))):
        table = tick_table(s)
        assert (table.stash_slots, table.grad_slots) == (stash, 1), s.name
    if m % p == 0:
        assert tick_table(interleaved_1f1b(p, m, 2)).stash_slots < 2 * m


def test_1f1b_two_ranks_by_hand():
    """p = 2, m = 2: rank 1 receives F(0)'s output in slot 0 at the end of tick 0, runs F and
    B of the last chunk on it, and sends the gradient back for rank 0's B in tick 3."""
    table = tick_table(one_f_one_b(2, 2))
    rank0 = [cell.op for cell in (row[0] for row in table.cells)]
    rank1 = [cell.op for cell in (row[1] for row in table.cells)]
    assert rank0 == [Op("F", 0, 0), Op("F", 1, 0), None, Op("B", 0, 0), None, Op("B", 1, 0)]
    assert rank1 == [None, Op("F", 0, 1), Op("B", 0, 1), Op("F", 1, 1), Op("B", 1, 1), None]
    assert table.cells[0][1] == Cell(recv_stash=0)
    assert table.cells[2][1] == Cell(Op("B", 0, 1), stash=0)
    assert table.cells[2][0].recv_grad == 0 and table.cells[3][0] == Cell(Op("B", 0, 0), grad=0)


def edited(table, t, r, **changes):
    cells = [list(row) for row in table.cells]
    cells[t][r] = dataclasses.replace(cells[t][r], **changes)
    return dataclasses.replace(table, cells=tuple(map(tuple, cells)))


def test_check_catches_a_clobbered_slot_a_stray_write_and_a_lost_op():
    table = tick_table(gpipe(2, 4))
    t = next(t for t, row in enumerate(table.cells) if row[1].recv_stash == 1)
    with pytest.raises(ValueError, match="arrives in x slot 0 holding"):  # microbatch 0's input
        check(edited(table, t, 1, recv_stash=0))
    with pytest.raises(ValueError, match="nothing arrives in g slot 0"):
        check(edited(table, 0, 0, recv_grad=0))
    with pytest.raises(ValueError, match="rank 0 runs 7 ops"):
        check(edited(table, 0, 0, op=None))
