"""Timing training steps on shared cores: interleaved rounds, contention watched.

Benchmarks here run on CPU devices that share two cores with whatever else the machine
does, so a step time means little alone. Each step records how many cores other processes
kept busy meanwhile (machine-wide busy CPU time from /proc/stat minus this process's own);
steps under QUIET_CORES count as clean. Configurations are timed in interleaved rounds in
a shuffled order, so slow drifts hit all of them alike, and compared by the median of
their clean steps.

Processes that cooperate can keep out of each other's timings: with `$JAXPAR_TIMING_LOCK`
naming a file, `alone()` holds it exclusively while work is timed, and a cooperating
process holds `working()` (shared) around each piece of work of its own; the test suite
runs in parallel this way while it calibrates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import numpy as np

QUIET_CORES = 0.35
_TICK = os.sysconf("SC_CLK_TCK")
LOCK_VARIABLE = "JAXPAR_TIMING_LOCK"


@contextmanager
def _timing_lock(mode: int) -> Iterator[None]:
    """The timing lock in `mode` (fcntl.LOCK_EX or LOCK_SH), taken after the turnstile: an
    exclusive taker holds the turnstile while it waits, so no new shared holder slips in
    ahead of it. A no-op without `$JAXPAR_TIMING_LOCK`."""
    path = os.environ.get(LOCK_VARIABLE)
    if not path:
        yield
        return
    with open(f"{path}.turn", "a") as turn, open(path, "a") as lock:
        fcntl.flock(turn, fcntl.LOCK_EX)
        if mode == fcntl.LOCK_SH:
            fcntl.flock(turn, fcntl.LOCK_UN)
        fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turn, fcntl.LOCK_UN)


def alone() -> contextlib.AbstractContextManager[None]:
    """Hold the timing lock exclusively: new work of cooperating processes waits at the
    turnstile, the work under way finishes first."""
    return _timing_lock(fcntl.LOCK_EX)


def working() -> contextlib.AbstractContextManager[None]:
    """Hold the timing lock shared: any number of workers at once, never while `alone()`
    times."""
    return _timing_lock(fcntl.LOCK_SH)


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:  # not Linux: contention unknown, every step counts as clean
        return math.nan, math.nan
    user, nice, system, _, _, irq, softirq, steal = (fields + [0] * 8)[:8]
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / _TICK, own.user + own.system


def foreign_cores(before: tuple[float, float], after: tuple[float, float],
                  seconds: float) -> float:
    """Average cores other processes used between two `cpu_seconds()` readings."""
    other = (after[0] - before[0]) - (after[1] - before[1])
    return 0.0 if math.isnan(other) else max(other, 0.0) / max(seconds, 1e-9)


def wait_quiet(max_wait: float, probe: float = 0.25) -> float:
    """Sleep in `probe`-second steps until other processes use under QUIET_CORES, at most
    `max_wait` seconds; returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        before = cpu_seconds()
        time.sleep(probe)
        if foreign_cores(before, cpu_seconds(), probe) <= QUIET_CORES:
            break
    return time.perf_counter() - start


@dataclasses.dataclass
class Timed:
    """One configuration under the clock: its step `fn(state, batch) -> (state, metrics)`,
    the live state and batch, and every step timed as (seconds, foreign cores)."""

    name: str
    fn: Callable[[Any, Any], tuple[Any, Any]]
    state: Any
    batch: Any
    role: str = ""  # free-form: "pick", "control", "peer", ...
    samples: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    def step(self) -> tuple[float, float]:
        """One timed step: (seconds, cores other processes kept busy meanwhile)."""
        before, start = cpu_seconds(), time.perf_counter()
        self.state, metrics = self.fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        seconds = time.perf_counter() - start
        return seconds, foreign_cores(before, cpu_seconds(), seconds)

    def warm_up(self) -> Timed:
        """One untimed step: first execution, allocator and thread pools settle."""
        self.step()
        return self

    @property
    def times(self) -> list[float]:
        return [t for t, _ in self.samples]

    @property
    def clean(self) -> list[float]:
        return [t for t, foreign in self.samples if foreign <= QUIET_CORES]

    def timed(self, min_clean: int = 0) -> np.ndarray:
        """The steps the measurement rests on: the clean ones, or all if too few are."""
        clean = self.clean
        return np.asarray(clean if clean and len(clean) >= min_clean else self.times)

    def median(self, min_clean: int = 0) -> float:
        return float(np.median(self.timed(min_clean)))

    def spread(self, min_clean: int = 0) -> float:
        """Interquartile range over median of the timed steps."""
        q1, median, q3 = np.percentile(self.timed(min_clean), [25, 50, 75])
        return float((q3 - q1) / median)


def visit(runs: Sequence[Timed], steps: int, rng: np.random.Generator,
          quiet_wait: float = 0.0, deadline: float = math.inf) -> None:
    """One round: every run in a random order, `steps` steps each, each visit after
    waiting up to `quiet_wait` seconds (never past `deadline`) for quiet cores."""
    for i in rng.permutation(len(runs)):
        wait_quiet(min(quiet_wait, deadline - time.perf_counter()))
        runs[i].samples.extend(runs[i].step() for _ in range(steps))


@contextmanager
def no_collector() -> Iterator[None]:
    """No garbage-collector pauses inside timed steps."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def interleave(runs: Sequence[Timed], rounds: int, steps: int, seed: int = 0,
               quiet_wait: float = 0.0) -> None:
    """`rounds` interleaved rounds of `steps` steps per run, in a shuffled order."""
    rng = np.random.default_rng(seed)
    with no_collector():
        for _ in range(rounds):
            visit(runs, steps, rng, quiet_wait)
