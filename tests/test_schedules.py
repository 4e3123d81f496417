"""Pipeline schedules and their simulator: every generator valid, bubbles and stashes as the
papers state, deadlocks and bad input reported with the numbers. Pure Python: no jax."""

import itertools
from collections import Counter

import pytest

from jaxpar.planners.schedules.generators import (
    Op,
    Schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zero_bubble_h1,
)
from jaxpar.planners.schedules.simulator import gantt, simulate, timeline_text

PS, MS, VS = (2, 4, 8), (4, 8, 16, 32), (1, 2, 4)


def all_schedules():
    """Every generator at every valid (p, m, v) of the grid."""
    for p, m in itertools.product(PS, MS):
        yield gpipe(p, m)
        yield one_f_one_b(p, m)
        if m >= p:
            yield zero_bubble_h1(p, m)
        for v in VS:
            if m % p == 0:
                yield interleaved_1f1b(p, m, v)


def test_every_schedule_is_valid_and_its_transfers_pair_up():
    for s in all_schedules():
        result = simulate(s)  # validates: each op once, on chunk mod p, no deadlock
        ran = Counter(slot.op for rank_slots in result.timeline for slot in rank_slots)
        kinds = "FBW" if s.name == "zb-h1" else "FB"
        assert len(ran) == sum(ran.values()) == len(kinds) * s.m * s.p * s.v, s.name
        for rank, rank_slots in enumerate(result.timeline):
            assert all(s.rank_of(slot.op.chunk) == rank for slot in rank_slots)
            assert all(a.end <= b.start for a, b in itertools.pairwise(rank_slots))
        # every send has its receive, and every chunk boundary carries 2 messages per microbatch
        sends = Counter(t for rank_sends in s.sends for t in rank_sends)
        recvs = Counter(t for rank_recvs in s.recvs for t in rank_recvs)
        assert sends == recvs
        assert sum(sends.values()) == 2 * s.m * (s.p * s.v - 1)
        assert all(t.src_rank == r for r, ts in enumerate(s.sends) for t in ts)
        assert all(t.dst_rank == r for r, ts in enumerate(s.recvs) for t in ts)


def test_dependencies_respected_with_p2p_and_uneven_chunk_times():
    s = interleaved_1f1b(4, 8, 2)
    f = [1.0 + 0.1 * c for c in range(8)]
    result = simulate(s, f=f, b=[2 * x for x in f], w=0.5, p2p=0.3)
    end = {slot.op: slot.end for rank_slots in result.timeline for slot in rank_slots}
    for rank_slots in result.timeline:
        for slot in rank_slots:
            op = slot.op
            if op.kind == "F" and op.chunk > 0:
                assert slot.start >= end[Op("F", op.microbatch, op.chunk - 1)] + 0.3 - 1e-12
            if op.kind == "B" and op.chunk < 7:
                assert slot.start >= end[Op("B", op.microbatch, op.chunk + 1)] + 0.3 - 1e-12
            if op.kind == "B" and op.chunk == 7:
                assert slot.start >= end[Op("F", op.microbatch, 7)]
            duration = {"F": f[op.chunk], "B": 2 * f[op.chunk] + 0.5}[op.kind]
            assert slot.end - slot.start == pytest.approx(duration)


@pytest.mark.parametrize("make", [gpipe, one_f_one_b])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(make):
    for p, m in itertools.product(PS, MS):
        result = simulate(make(p, m), f=1.0, b=0.6, w=0.4)  # B + W folded: equal to F
        assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-9)
        assert result.step_time == pytest.approx((m + p - 1) * 2.0, abs=1e-9)


def test_interleaving_divides_the_bubble_time_by_v():
    for p, m in itertools.product(PS, MS):
        if m % p:
            continue
        base = simulate(one_f_one_b(p, m), f=1.0, b=1.0, w=1.0).bubble_time
        for v in (2, 4):
            chunk = 1.0 / v  # same model cut into v times more, v times smaller chunks
            result = simulate(interleaved_1f1b(p, m, v), f=chunk, b=chunk, w=chunk)
            assert result.bubble_time * v == pytest.approx(base, rel=0.03), (p, m, v)
            assert result.bubble_fraction < simulate(one_f_one_b(p, m)).bubble_fraction


def test_zero_bubble_h1_has_a_third_of_1f1b_bubble_at_the_same_peak_stash():
    for p, m in itertools.product(PS, MS):
        if m < 2 * p:
            continue
        zb = simulate(zero_bubble_h1(p, m), f=1.0, b=1.0, w=1.0)
        base = simulate(one_f_one_b(p, m), f=1.0, b=1.0, w=1.0)
        assert 0.25 <= zb.bubble_time / base.bubble_time <= 0.45, (p, m)
        assert max(zb.peak_stash) == max(base.peak_stash) == p


def test_peak_stash_1f1b_rank0_at_most_p_gpipe_m():
    for p, m in itertools.product(PS, MS):
        assert simulate(one_f_one_b(p, m)).peak_stash[0] == min(p, m)
        assert simulate(one_f_one_b(p, m)).peak_stash == tuple(min(p - r, m) for r in range(p))
        assert simulate(gpipe(p, m)).peak_stash == (m,) * p


def test_interleaved_follows_megatron_warmup_and_chunk_order():
    p, m, v = 4, 8, 2
    s = interleaved_1f1b(p, m, v)
    for r, rank_ops in enumerate(s.ops):
        warmup = 2 * (p - r - 1) + (v - 1) * p
        assert [op.kind for op in rank_ops[:warmup + 1]] == ["F"] * (warmup + 1)
        assert rank_ops[warmup + 1].kind == "B"
    forwards = [(op.microbatch, op.chunk) for op in s.ops[1] if op.kind == "F"]
    assert forwards[:10] == [(0, 1), (1, 1), (2, 1), (3, 1), (0, 5), (1, 5), (2, 5), (3, 5),
                             (4, 1), (5, 1)]
    backwards = [(op.microbatch, op.chunk) for op in s.ops[1] if op.kind == "B"]
    assert backwards[:5] == [(0, 5), (1, 5), (2, 5), (3, 5), (0, 1)]
    assert interleaved_1f1b(p, m, 1) == one_f_one_b(p, m)


def test_deadlocking_schedule_names_rank_op_and_input():
    # rank 0 runs B of microbatch 1 before its forward: a cycle through rank 1
    ops = ((Op("F", 0, 0), Op("B", 1, 0), Op("F", 1, 0), Op("B", 0, 0)),
           (Op("F", 0, 1), Op("B", 0, 1), Op("F", 1, 1), Op("B", 1, 1)))
    with pytest.raises(ValueError, match=r"deadlocks: rank 0 waits at B\(mb=1, chunk=0\) for "
                                         r"B\(mb=1, chunk=1\) from rank 1; rank 1 waits at "
                                         r"F\(mb=1, chunk=1\) for F\(mb=1, chunk=0\) from rank 0"):
        simulate(Schedule("hand-made", 2, 2, 1, ops))


def test_invalid_schedules_are_rejected():
    good = one_f_one_b(2, 2)
    misplaced = (good.ops[0] + (Op("F", 1, 1),), good.ops[1][1:])
    with pytest.raises(ValueError, match=r"F\(mb=1, chunk=1\) is on rank 0 but chunk 1 lives "
                                         r"on rank 1"):
        simulate(Schedule("bad", 2, 2, 1, misplaced))
    with pytest.raises(ValueError, match=r"repeated: \['F\(mb=0, chunk=0\)'\], missing: none"):
        simulate(Schedule("bad", 2, 2, 1, ((Op("F", 0, 0),) + good.ops[0], good.ops[1])))
    with pytest.raises(ValueError, match=r"rank 1 runs F\(mb=2, chunk=1\), which is not an op "
                                         r"of m=2 microbatches"):
        simulate(Schedule("bad", 2, 2, 1, (good.ops[0], good.ops[1] + (Op("F", 2, 1),))))
    with pytest.raises(ValueError, match="b has 3 per-chunk times but the schedule has 2 chunks"):
        simulate(good, b=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="f time 0 of a chunk: must be > 0"):
        simulate(good, f=[1.0, 0])
    with pytest.raises(ValueError, match="p2p=-1: a transfer time must be >= 0"):
        simulate(good, p2p=-1)


@pytest.mark.parametrize("call, message", [
    (lambda: gpipe(0, 4), "p=0: must be an integer >= 1"),
    (lambda: one_f_one_b(4, 0), "m=0: must be an integer >= 1"),
    (lambda: interleaved_1f1b(4, 8, 0), "v=0: must be an integer >= 1"),
    (lambda: interleaved_1f1b(4, 6, 2), "got m=6, p=4: use m=4 or m=8"),
    (lambda: interleaved_1f1b(8, 4, 2), "got m=4, p=8: use m=8"),
    (lambda: zero_bubble_h1(8, 4), "got m=4, p=8: use m >= 8"),
])
def test_bad_input_raises_with_the_numbers_and_the_fix(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_ascii_timeline_has_a_row_per_rank():
    result = simulate(one_f_one_b(4, 8), f=1.0, b=1.0, w=0.0)
    text = timeline_text(result, width=22)  # one column per time unit
    rows = text.splitlines()
    assert len(rows) == 4 + 1 and all(row.startswith(f"rank {r} |") for r, row in
                                      enumerate(rows[:4]))
    assert rows[0] == "rank 0 |0123...a4b5c6d7e.f.g.h|"
    assert rows[3] == "rank 3 |...0a1b2c3d4e5f6g7h...|"


def test_gantt_writes_a_png(tmp_path):
    path = tmp_path / "zb.png"
    fig = gantt(simulate(zero_bubble_h1(4, 8)), path=str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [f"rank {r}" for r in range(4)]
