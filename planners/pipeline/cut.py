"""Cutting the layer stack into chunks: Alpa's inter-operator DP (`cut_layers`), the most
layers a chunk may hold, and the O(1) step estimate that ranks candidates before any cut."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from jaxpar.planners.pipeline.cost import Candidate, Cost, PieceCosts, extras_of, proxy_memory
from jaxpar.planners.schedules.generators import in_flight


def cut_layers(times: Sequence[float], chunks: int, first: float = 0.0, last: float = 0.0,
               fits: Callable[[int], np.ndarray] | None = None
               ) -> tuple[tuple[tuple[int, int], ...], float] | None:
    """Cut layers 0..L-1 into `chunks` contiguous non-empty ranges minimising the bottleneck
    max_c time_c, time_c = sum(times[i:j]) + first [c = 0] + last [c = chunks - 1], where
    `fits(c)[i, j]` says whether layers i..j-1 may form chunk c (memory). Alpa's inter-op DP:

        best_c(j) = min_i max(best_{c-1}(i), time_c(i, j)),  best_{-1} = 0 at j = 0 only,

    over all (i, j) at once per chunk (numpy). Ties go to the cut whose later chunks are
    smallest. Returns the ranges and the bottleneck, or None if no cut fits.
    """
    n = len(times)
    if not 1 <= chunks <= n:
        raise ValueError(f"{n} layers cannot be cut into {chunks} chunks of at least one "
                         f"layer; use between 1 and {n} chunks")
    prefix = np.concatenate([[0.0], np.cumsum(times)])
    span = prefix[None, :] - prefix[:, None]
    index = np.arange(n + 1)
    nonempty = index[:, None] < index[None, :]
    best = np.where(index == 0, 0.0, np.inf)
    choices = []
    for c in range(chunks):
        allowed = nonempty if fits is None else nonempty & fits(c)
        extras = first * (c == 0) + last * (c == chunks - 1)
        candidate = np.where(allowed, np.maximum(best[:, None], span + extras), np.inf)
        best = candidate.min(axis=0)
        ties = candidate <= best * (1 + 1e-9) + 1e-300
        choices.append(n - np.argmax(ties[::-1], axis=0))
    if not np.isfinite(best[n]):
        return None
    bounds, j = [], n
    for c in reversed(range(chunks)):
        i = int(choices[c][j])
        bounds.append((i, j))
        j = i
    return tuple(reversed(bounds)), float(best[n])


def max_layers(model: PieceCosts, extras: Cost, v: int, stashed: int, held: int,
                budget: float) -> int:
    """The most layers a chunk with `extras` may take: `proxy_memory` <= budget solved for
    k (it is max(a k + c + temporary, (a + P) k + c + P0), both pieces linear in k)."""
    lay = model.layer
    a = v * (lay.params + lay.grads + lay.optimizer) + stashed * lay.stash + held * lay.extra
    c = (extras.params + extras.grads + extras.optimizer + model.batch + model.reserve
         + (stashed * extras.stash + held * extras.extra) / v)
    temporary = max(lay.temporary, extras.temporary)
    k = min((budget - c - temporary) / a, (budget - c - extras.params) / (a + v * lay.params))
    return math.floor(k + 1e-9)


def estimate_step(model: PieceCosts, cfg: Candidate, layers: int, budget: float) -> float | None:
    """An O(1) estimate of the step: the least bottleneck T of chunks holding whole layers
    (the first on rank 0 and the last on rank p - 1 with their extras, the others at the
    worst rank's in-flight count, each under its memory cap), then Alpa's sum + (m - 1) max
    for one chunk per rank, m max(total / p, T) + (p - 1) total / (p v) interleaved, and the
    zero-bubble fill shrunk by its W share."""
    p, v, m = cfg.p, cfg.v, cfg.m
    chunks = p * v
    counts = in_flight(cfg.schedule, p, m, v)
    worst = tuple(max(x) for x in zip(*counts))
    lay = model.layer
    ell = lay.time
    kinds = ((model.first, 1, counts[0]), (Cost(), chunks - 2, worst),
             (model.last, 1, counts[-1]))
    caps = [min(max_layers(model, e, v, *count, budget), layers) for e, _, count in kinds]
    if min(caps[0], caps[2]) < 1 or (chunks > 2 and caps[1] < 1):
        return None

    def holds(bottleneck: float) -> bool:
        sizes = [min(cap, math.floor((bottleneck - e.time) / ell + 1e-9))
                 for cap, (e, _, _) in zip(caps, kinds)]
        if min(s for s, (_, n, _) in zip(sizes, kinds) if n) < 1:
            return False
        return sum(s * n for s, (_, n, _) in zip(sizes, kinds)) >= layers

    bottleneck = math.inf
    for extra in {model.first.time, 0.0, model.last.time}:
        lo, hi = 1, layers
        if not holds(hi * ell + extra):
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if holds(mid * ell + extra) else (mid + 1, hi)
        bottleneck = min(bottleneck, lo * ell + extra)
    if math.isinf(bottleneck):
        return None
    total = layers * ell + model.first.time + model.last.time
    if v > 1:
        pipe = m * max(total / p, bottleneck) + (p - 1) * total / chunks
    elif cfg.schedule == "zero_bubble_h1":
        pipe = m * bottleneck + (total - bottleneck) * (lay.f + lay.b - lay.w) / ell
    else:
        pipe = m * bottleneck + total - bottleneck
    sync = layers / p * lay.sync + max(model.first.sync, model.last.sync) + model.tied_sync
    return pipe + 2 * (p - 1) * model.p2p + sync


def cut_stack(model: PieceCosts, cfg: Candidate, layers: int, budget: float
         ) -> tuple[tuple[int, int], ...] | None:
    """The DP cut of `layers` identical layers into p v chunks under each rank's memory (a
    chunk's memory depends on its layer count k = j - i, its rank's in-flight counts and
    whether it is the first or the last chunk: priced once per such kind)."""
    chunks = cfg.p * cfg.v
    counts = in_flight(cfg.schedule, cfg.p, cfg.m, cfg.v)
    index = np.arange(layers + 1)
    span = np.maximum(index[None, :] - index[:, None], 0)
    kinds: dict[tuple, np.ndarray] = {}

    def fits(c: int) -> np.ndarray:
        kind = (counts[c % cfg.p], c == 0, c == chunks - 1)
        if kind not in kinds:
            (stashed, held), _, _ = kind
            memory = sum(proxy_memory(model.layer * index, extras_of(model, c, chunks), cfg.v,
                                       stashed, held, model).values())
            kinds[kind] = (memory <= budget)[span]
        return kinds[kind]

    found = cut_layers([model.layer.time] * layers, chunks, model.first.time,
                       model.last.time, fits)
    return None if found is None else found[0]
