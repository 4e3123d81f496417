"""Pipeline schedules as data: per-rank ordered lists of F / B / W ops and the transfers they imply.

A model is cut into `p * v` chunks (virtual stages); chunk `c` lives on rank `c % p`, so with
`v = 1` chunk and rank coincide, and with interleaving rank `r` holds chunks r, r + p, ....
F(mb, c) runs chunk c forward on microbatch mb; B(mb, c) its backward (input gradient, plus the
weight gradient unless the schedule has W ops); W(mb, c) the deferred weight gradient.
Generators are small pure functions; `simulator.simulate` times and validates their output.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

from jaxpar.pipelining import SCHEDULES

Kind = Literal["F", "B", "W"]


class Op(NamedTuple):
    """One unit of pipeline work: `kind` pass of `chunk` on `microbatch`. A named tuple:
    simulators hash millions of them."""

    kind: Kind
    microbatch: int
    chunk: int

    def __str__(self) -> str:
        return f"{self.kind}(mb={self.microbatch}, chunk={self.chunk})"


@dataclasses.dataclass(frozen=True)
class Transfer:
    """A point-to-point message: activations go to chunk + 1, gradients to chunk - 1."""

    kind: Literal["activation", "gradient"]
    microbatch: int
    src_chunk: int
    dst_chunk: int
    src_rank: int
    dst_rank: int


@dataclasses.dataclass(frozen=True)
class Schedule:
    """`ops[r]` is the order in which rank r runs its ops; `p` ranks, `m` microbatches,
    `v` chunks per rank."""

    name: str
    p: int
    m: int
    v: int
    ops: tuple[tuple[Op, ...], ...]

    @property
    def num_chunks(self) -> int:
        return self.p * self.v

    def rank_of(self, chunk: int) -> int:
        """Chunk c is virtual stage c; it lives on rank c mod p (Megatron's layout)."""
        return chunk % self.p

    @functools.cached_property
    def splits_backward(self) -> bool:
        """True when the weight gradient runs as separate W ops (zero-bubble schedules)."""
        return any(op.kind == "W" for rank_ops in self.ops for op in rank_ops)

    @property
    def sends(self) -> tuple[tuple[Transfer, ...], ...]:
        """Per rank, in issue order: what each F / B sends to another rank once it is done."""
        return tuple(tuple(t for op in rank_ops if (t := self._outgoing(op)) is not None)
                     for rank_ops in self.ops)

    @property
    def recvs(self) -> tuple[tuple[Transfer, ...], ...]:
        """Per rank, in need order: what each F / B must receive from another rank to start."""
        return tuple(tuple(t for op in rank_ops if (t := self._incoming(op)) is not None)
                     for rank_ops in self.ops)

    def _outgoing(self, op: Op) -> Transfer | None:
        if op.kind == "F" and op.chunk + 1 < self.num_chunks:
            return self._transfer("activation", op.microbatch, op.chunk, op.chunk + 1)
        if op.kind == "B" and op.chunk > 0:
            return self._transfer("gradient", op.microbatch, op.chunk, op.chunk - 1)
        return None

    def _incoming(self, op: Op) -> Transfer | None:
        if op.kind == "F" and op.chunk > 0:
            return self._transfer("activation", op.microbatch, op.chunk - 1, op.chunk)
        if op.kind == "B" and op.chunk + 1 < self.num_chunks:
            return self._transfer("gradient", op.microbatch, op.chunk + 1, op.chunk)
        return None

    def _transfer(self, kind: Literal["activation", "gradient"], microbatch: int, src: int,
                  dst: int) -> Transfer | None:
        src_rank, dst_rank = self.rank_of(src), self.rank_of(dst)
        if src_rank == dst_rank:
            return None
        return Transfer(kind, microbatch, src, dst, src_rank, dst_rank)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")


def gpipe(p: int, m: int) -> Schedule:
    """GPipe: every rank runs all m forwards, then all m backwards (in reverse order, so the
    last microbatch's gradient, which arrives first, is consumed first). Stashes m."""
    _check_positive(p=p, m=m)
    ops = tuple(tuple([Op("F", i, r) for i in range(m)]
                      + [Op("B", i, r) for i in reversed(range(m))]) for r in range(p))
    return Schedule("gpipe", p, m, 1, ops)


def one_f_one_b(p: int, m: int) -> Schedule:
    """1F1B (PipeDream-flush): rank r warms up with min(p - r - 1, m) forwards, then alternates
    one forward and one backward, then drains; at most p - r microbatches are stashed."""
    _check_positive(p=p, m=m)
    ops = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        rank_ops = [Op("F", i, r) for i in range(warmup)]
        for i in range(m - warmup):
            rank_ops += [Op("F", warmup + i, r), Op("B", i, r)]
        rank_ops += [Op("B", i, r) for i in range(m - warmup, m)]
        ops.append(tuple(rank_ops))
    return Schedule("1f1b", p, m, 1, tuple(ops))


def interleaved_1f1b(p: int, m: int, v: int) -> Schedule:
    """Megatron-LM's interleaved 1F1B with v chunks per rank (virtual stage c * p + r on rank r).

    Rank r warms up with min(2 (p - r - 1) + (v - 1) p, m v) forwards, then alternates.
    The k-th forward runs local chunk (k // p) mod v on microbatch (k // (p v)) p + k mod p;
    the k-th backward the same microbatch on local chunk v - 1 - (k // p) mod v. Megatron
    requires m mod p == 0. With v = 1 this is `one_f_one_b` (Megatron's non-interleaved path).
    """
    _check_positive(p=p, m=m, v=v)
    if v == 1:
        return one_f_one_b(p, m)
    if m % p:
        lower, upper = (m // p) * p, (m // p + 1) * p
        fix = f"m={lower} or m={upper}" if lower else f"m={upper}"
        raise ValueError(f"interleaved 1F1B needs the microbatch count to be a multiple of the "
                         f"pipeline degree (Megatron-LM's rule); got m={m}, p={p}: use {fix}")

    def op(kind: Kind, k: int, r: int) -> Op:
        local = (k // p) % v
        if kind == "B":
            local = v - 1 - local
        return Op(kind, (k // (p * v)) * p + k % p, local * p + r)

    total = m * v
    ops = []
    for r in range(p):
        warmup = min(2 * (p - r - 1) + (v - 1) * p, total)
        rank_ops = [op("F", k, r) for k in range(warmup)]
        for k in range(total - warmup):
            rank_ops += [op("F", warmup + k, r), op("B", k, r)]
        rank_ops += [op("B", k, r) for k in range(total - warmup, total)]
        ops.append(tuple(rank_ops))
    return Schedule(f"interleaved-1f1b-v{v}", p, m, v, tuple(ops))


def zero_bubble_h1(p: int, m: int) -> Schedule:
    """ZB-H1 (Qi et al. 2023): 1F1B with the backward split into B (input gradient, on the
    critical path) and W (weight gradient, deferred into bubbles).

    Rank r warms up with p - r forwards, runs its first r B's without W so the B chain reaches
    rank 0 in B rather than B + W time per hop, then B, W(lagging r), F; the r held-back W's
    fill the drain. Every rank holds p microbatches from F to W, 1F1B's peak (rank 0), and the
    bubble shrinks from (p - 1)(F + B + W) to (p - 1)(F + B - W). Needs m >= p.
    """
    _check_positive(p=p, m=m)
    if m < p:
        raise ValueError(f"ZB-H1 needs at least as many microbatches as pipeline ranks; got "
                         f"m={m}, p={p}: use m >= {p}")
    ops = []
    for r in range(p):
        warmup = p - r
        rank_ops = [Op("F", i, r) for i in range(warmup)]
        for i in range(m):
            rank_ops.append(Op("B", i, r))
            if i >= r:
                rank_ops.append(Op("W", i - r, r))
            if warmup + i < m:
                rank_ops.append(Op("F", warmup + i, r))
        rank_ops += [Op("W", i, r) for i in range(m - r, m)]
        ops.append(tuple(rank_ops))
    return Schedule("zb-h1", p, m, 1, tuple(ops))


def check_schedule(name: str, v: int) -> None:
    """Raise ValueError unless `name` is a schedule that runs `v` chunks per rank."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if v < 1 or (v > 1 and name != "interleaved_1f1b"):
        raise ValueError(f"{name} runs one chunk per rank; v={v} virtual stages need "
                         f"interleaved_1f1b (v >= 1)")


@functools.lru_cache(maxsize=32)
def make_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """The named schedule's op lists; the generators raise ValueError on an m they refuse.
    Memoised: a schedule is immutable, and the planner prices each one in several ways."""
    check_schedule(name, v)
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "zero_bubble_h1":
        return zero_bubble_h1(p, m)
    return interleaved_1f1b(p, m, v)



def schedule_allows(name: str, p: int, m: int, v: int) -> bool:
    """The generators' conditions on m, without building the schedule: interleaving needs
    m mod p = 0 (Megatron-LM), ZB-H1 m >= p."""
    if name == "interleaved_1f1b" and v > 1:
        return m % p == 0
    return name != "zero_bubble_h1" or m >= p



def in_flight(name: str, p: int, m: int, v: int) -> tuple[tuple[int, int], ...]:
    """Per rank r, the most (microbatch, chunk) activations stashed at once and the most held
    between B and W (zero-bubble only): GPipe m; 1F1B min(p - r, m); interleaved
    min(2 (p - r - 1) + (v - 1) p + 1, m v); ZB-H1 p stashed and min(r + 1, m) held."""
    if name == "gpipe":
        return ((m, 0),) * p
    if name == "zero_bubble_h1":
        return tuple((min(p, m), min(r + 1, m)) for r in range(p))
    if v == 1:
        return tuple((min(p - r, m), 0) for r in range(p))
    return tuple((min(2 * (p - r - 1) + (v - 1) * p + 1, m * v), 0) for r in range(p))
