"""A priced pipeline: its ranks, their memory and the simulated step (`PipelinePlan`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from jaxpar.plan import Alternative, Pipeline, Plan, Predicted, runners_up
from jaxpar.planners.graph import ModelGraph
from jaxpar.planners.pipeline.cost import (
    Candidate,
    Cost,
    PieceCosts,
    Pricer,
    chunk_costs,
    live_bytes,
    rank_memory,
    step_sync,
)
from jaxpar.planners.schedules.generators import make_schedule
from jaxpar.planners.schedules.simulator import simulate

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Stage:
    """One pipeline rank: its chunks' layer ranges, the groups it holds, its per-device
    memory by category and its peak number of stashed (microbatch, chunk) activations."""

    rank: int
    chunks: tuple[tuple[int, int], ...]
    groups: tuple[str, ...]
    memory_bytes: dict[str, float]
    peak_stash: int

    @property
    def total_bytes(self) -> float:
        return sum(self.memory_bytes.values())


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """A pipeline: p stages of `stage_plan` (one intra-stage sharding for every stage; all
    stages run the same layer program), v chunks per rank, m microbatches of
    `microbatch_size` per replica, the schedule; per-chunk (F, B, W) seconds per microbatch,
    the p2p time per transfer, the simulated pipeline time and bubble, the gradient sync once
    per step; `flat` is the best plan without pipelining (None if none fits or nothing was
    searched). `stage_plan.microbatches` is 1: a stage program runs one microbatch at a time;
    m is the pipeline's."""

    p: int
    v: int
    m: int
    schedule: str
    microbatch_size: int
    stage_plan: Plan
    stages: tuple[Stage, ...]
    chunk_times: tuple[tuple[float, float, float], ...]
    p2p_s: float
    pipeline_s: float
    sync_s: float
    bubble_fraction: float
    flat: Plan | None = None
    alternatives: tuple[Alternative, ...] = ()
    source: str = ""

    @property
    def step_s(self) -> float:
        return self.pipeline_s + self.sync_s

    @property
    def num_devices(self) -> int:
        return self.p * self.stage_plan.num_devices

    @property
    def memory_bytes(self) -> float:
        """The largest rank's per-device bytes: what must fit the budget."""
        return max(s.total_bytes for s in self.stages)

    @property
    def pipelined(self) -> bool:
        """Whether this pipeline beats the best plan without one."""
        return self.flat is None or self.step_s < self.flat.predicted.step_s

    @property
    def name(self) -> str:
        """'pp8 v2 interleaved_1f1b m64 b1 x dp6+tp8 remat'."""
        return Candidate(self.p, self.v, self.m, self.schedule, self.microbatch_size,
                       self.stage_plan).name

    def explain(self) -> str:
        """The pipeline, its prediction, why pipelining was or was not chosen, runners-up."""
        worst = max(self.stages, key=lambda s: s.total_bytes)
        lines = [f"Pipeline {self.name} ({self.p} stages of {self.stage_plan.num_devices} "
                 f"devices): predicted step {self.step_s:.4g} s (pipeline {self.pipeline_s:.4g}"
                 f" s simulated, bubble {self.bubble_fraction:.1%}, gradient sync "
                 f"{self.sync_s:.4g} s), {worst.total_bytes / GiB:.2f} GiB per device on "
                 f"rank {worst.rank}"]
        for s in self.stages if self.p <= 8 else (self.stages[0], self.stages[-1]):
            lines.append(f"  rank {s.rank}: {', '.join(s.groups)}; {s.total_bytes / GiB:.2f} "
                         f"GiB, {s.peak_stash} microbatch chunks stashed")
        if self.flat is None and not self.alternatives:
            lines.append("A given configuration: nothing was searched or compared.")
        elif self.flat is None:
            lines.append("Pipelining chosen: no plan without it fits the memory budget.")
        else:
            flat = self.flat.predicted.step_s
            verdict = "chosen" if self.pipelined else "not chosen"
            lines.append(f"Pipelining {verdict}: the best plan without it, {self.flat.name}, "
                         f"is predicted {flat:.4g} s ({self.step_s / flat - 1:+.1%} for the "
                         f"pipeline){'' if self.pipelined else '; use `flat`'}.")
        return "\n".join(lines + runners_up(self.alternatives, "s"))

    def to_plan(self, form: str = "mpmd") -> Plan:
        """The Plan the emitter runs: a `stage` axis of p before the stage mesh, the cut as
        layers per chunk, the schedule and predicted bubble; predicted memory is the
        largest rank's, its compute the simulated pipeline (bubble and p2p included) and its
        communication the gradient sync after the flush; the runners-up (the best plan
        without a pipeline first) carry over, so `explain()` says why pipelining was chosen."""
        stage = self.stage_plan
        chunks = sorted(c for s in self.stages for c in s.chunks)
        worst = max(self.stages, key=lambda s: s.total_bytes)
        predicted = Predicted(worst.memory_bytes, self.pipeline_s, self.sync_s, {},
                              self.source, None)
        return dataclasses.replace(
            stage, mesh=(("stage", self.p),) + stage.mesh, microbatches=self.m,
            name=self.name, predicted=predicted, alternatives=self.alternatives,
            pipeline=Pipeline(self.schedule, self.v, form, tuple(j - i for i, j in chunks),
                              self.bubble_fraction))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(dataclasses.asdict(self), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> PipelinePlan:
        d = json.loads(text)
        d["stage_plan"] = Plan.from_json(json.dumps(d["stage_plan"]))
        d["flat"] = None if d["flat"] is None else Plan.from_json(json.dumps(d["flat"]))
        d["stages"] = tuple(Stage(s["rank"], tuple(map(tuple, s["chunks"])), tuple(s["groups"]),
                                  s["memory_bytes"], s["peak_stash"]) for s in d["stages"])
        d["chunk_times"] = tuple(map(tuple, d["chunk_times"]))
        d["alternatives"] = tuple(Alternative(**a) for a in d["alternatives"])
        return cls(**d)


def step_flops(graph: ModelGraph, remat: bool) -> tuple[float, float]:
    """(model, hardware) FLOPs of a step: 3 x forward, plus the stack's recomputed forward
    under remat (Megatron-LM's 'with recomputation' count)."""
    model = 3 * graph.flops_fwd
    recomputed = sum(g.flops_fwd * g.repeat for g in graph.groups if g.repeat > 1)
    return model, model + (recomputed if remat else 0.0)


def finish(pricer: Pricer, cfg: Candidate, model: PieceCosts, bounds: Sequence[tuple[int, int]]
            ) -> PipelinePlan:
    """Simulate the cut and lay out its ranks' groups and memory."""
    p, v = cfg.p, cfg.v
    costs = chunk_costs(model, bounds)
    schedule = make_schedule(cfg.schedule, p, cfg.m, v)
    result = simulate(schedule, [c.f for c in costs], [c.b for c in costs],
                      [c.w for c in costs], model.p2p)
    parts = pricer.parts
    stages = []
    for r in range(p):
        mine = range(r, p * v, p)
        rank = sum((costs[c] for c in mine), Cost())
        live = live_bytes(schedule.ops[r], [c.stash for c in costs], [c.extra for c in costs],
                          schedule.splits_backward)
        groups = []
        for c in mine:
            if c == 0:
                groups += [g.name for g in parts.first]
            groups.append(f"{parts.layer.name}[{bounds[c][0]}:{bounds[c][1]}]")
            if c == p * v - 1:
                groups += [g.name + (" (tied output)" if {q.path for q in g.params}
                                     & set(parts.tied) else "") for g in parts.last]
        memory = {k: float(x) for k, x in rank_memory(rank, live, model.batch,
                                                      model.reserve).items()}
        stages.append(Stage(r, tuple(bounds[c] for c in mine), tuple(groups), memory,
                            result.peak_stash[r]))
    return PipelinePlan(p, v, cfg.m, cfg.schedule, cfg.microbatch_size, cfg.stage_plan,
                        tuple(stages), tuple((c.f, c.b, c.w) for c in costs), model.p2p,
                        result.step_time, step_sync(model, costs, p), result.bubble_fraction)
