"""A priced pipeline: its ranks, their memory and its step in each form (`PipelinePlan`)."""

from __future__ import annotations

import dataclasses
import json
import math
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
from jaxpar.planners.schedules.simulator import peak_stash, simulate
from jaxpar.planners.schedules.ticks import lockstep_time

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
    the p2p time per transfer, the pipeline time and bubble in the chosen `form`, the
    gradient sync once per step; `forms` every form priced (form, step seconds, largest
    rank's bytes); `flat` is the best plan without pipelining (None if none fits or nothing
    was searched). `stage_plan.microbatches` is 1: a stage program runs one microbatch at a
    time; m is the pipeline's."""

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
    form: str = "mpmd"
    forms: tuple[tuple[str, float, float], ...] = ()  # (form, step_s, memory_bytes) priced
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
                 f"devices, {self.form.upper()} form): predicted step {self.step_s:.4g} s "
                 f"(pipeline {self.pipeline_s:.4g} s, bubble {self.bubble_fraction:.1%}, "
                 f"gradient sync {self.sync_s:.4g} s), {worst.total_bytes / GiB:.2f} GiB per "
                 f"device on rank {worst.rank}"]
        for form, step, memory in self.forms:
            lines.append(f"  {form.upper()} form: {step:.4g} s, {memory / GiB:.2f} GiB"
                         + (" (chosen)" if form == self.form else ""))
        if len(self.forms) == 1:
            lines.append("  SPMD form not priced: it needs equal chunks and ZeRO 0")
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

    def to_plan(self) -> Plan:
        """The Plan the emitter runs: a `stage` axis of p before the stage mesh, the cut as
        layers per chunk, the schedule and predicted bubble; predicted memory is the
        largest rank's, its compute the pipeline in its form (bubble and p2p included) and its
        communication the gradient sync after the flush; the other form's price, then the
        runners-up (the best plan without a pipeline first) carry over, so `explain()` says
        why this form and why pipelining were chosen."""
        stage = self.stage_plan
        chunks = sorted(c for s in self.stages for c in s.chunks)
        worst = max(self.stages, key=lambda s: s.total_bytes)
        predicted = Predicted(worst.memory_bytes, self.pipeline_s, self.sync_s, {},
                              self.source, None)
        other_forms = tuple(
            Alternative(f"{self.name} in the {form.upper()} form", step, memory,
                        f"{step / self.step_s - 1:+.1%} step time")
            for form, step, memory in self.forms if form != self.form)
        return dataclasses.replace(
            stage, mesh=(("stage", self.p),) + stage.mesh, microbatches=self.m,
            name=self.name, predicted=predicted, alternatives=other_forms + self.alternatives,
            pipeline=Pipeline(self.schedule, self.v, self.form, tuple(j - i for i, j in chunks),
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
        d["forms"] = tuple(map(tuple, d.get("forms", ())))
        return cls(**d)


def step_flops(graph: ModelGraph, remat: bool) -> tuple[float, float]:
    """(model, hardware) FLOPs of a step: 3 x forward, plus the stack's recomputed forward
    under remat (Megatron-LM's 'with recomputation' count)."""
    model = 3 * graph.flops_fwd
    recomputed = sum(g.flops_fwd * g.repeat for g in graph.groups if g.repeat > 1)
    return model, model + (recomputed if remat else 0.0)


def finish(pricer: Pricer, cfg: Candidate, model: PieceCosts, bounds: Sequence[tuple[int, int]],
           budget: float = math.inf) -> PipelinePlan:
    """Price the cut in both forms and keep the faster that fits `budget` (the faster of
    all if neither does). MPMD: the simulated schedule, or the host launching its ops one by
    one if that takes longer. SPMD (equal chunks and ZeRO 0 only, as its runtime needs): the
    tick table in lock-step, every rank holding the parameters outside the stack and
    all-reducing their gradient over `stage`."""
    priced = [_form(pricer, cfg, model, bounds, "mpmd")]
    chunks = cfg.p * cfg.v
    layers = pricer.parts.layers
    if cfg.stage_plan.zero == 0 and layers % chunks == 0:
        k = layers // chunks
        priced.append(_form(pricer, cfg, model, [(c * k, (c + 1) * k) for c in range(chunks)],
                            "spmd"))
    fitting = [plan for plan in priced if plan.memory_bytes <= budget] or priced
    best = min(fitting, key=lambda plan: plan.step_s)
    forms = tuple((plan.form, plan.step_s, plan.memory_bytes) for plan in priced)
    return dataclasses.replace(best, forms=forms)


def _form(pricer: Pricer, cfg: Candidate, model: PieceCosts,
          bounds: Sequence[tuple[int, int]], form: str) -> PipelinePlan:
    """The cut priced in one form; its ranks' groups and memory laid out."""
    p, v = cfg.p, cfg.v
    costs = chunk_costs(model, bounds)
    schedule = make_schedule(cfg.schedule, p, cfg.m, v)
    f, b, w = ([c.f for c in costs], [c.b for c in costs], [c.w for c in costs])
    parts, cluster = pricer.parts, pricer.cluster
    spmd = form == "spmd"
    if spmd:
        pipeline_s = lockstep_time(schedule, f, b, w, model.p2p) + cluster.dispatch_latency
        peaks = tuple(peak_stash(ops, schedule.splits_backward) for ops in schedule.ops)
    else:
        result = simulate(schedule, f, b, w, model.p2p)
        # the driver launches every op, and a device_put for each activation and gradient
        # that moves to the next chunk's stage
        launches = sum(map(len, schedule.ops)) + 2 * cfg.m * (p * v - 1)
        pipeline_s = max(result.step_time, launches * cluster.dispatch_latency)
        peaks = result.peak_stash
    outer = model.first + model.last  # SPMD: replicated over `stage`, on every rank
    lives = [live_bytes(schedule.ops[r], [c.stash for c in costs], [c.extra for c in costs],
                        schedule.splits_backward) for r in range(p)]
    stages = []
    for r in range(p):
        mine = range(r, p * v, p)
        rank = sum((costs[c] for c in mine), Cost())
        if spmd and 0 not in mine:
            rank = rank + dataclasses.replace(Cost(), params=outer.params, grads=outer.grads,
                                               optimizer=outer.optimizer)
        groups = []
        for c in mine:
            if c == 0 or spmd:
                groups += [g.name for g in parts.first]
            groups.append(f"{parts.layer.name}[{bounds[c][0]}:{bounds[c][1]}]")
            if c == p * v - 1 or spmd:
                groups += [g.name + (" (tied output)" if {q.path for q in g.params}
                                     & set(parts.tied) else "") for g in parts.last]
        live = max(lives) if spmd else lives[r]  # SPMD buffers: the busiest rank's slots
        memory = {k: float(x) for k, x in rank_memory(rank, live, model.batch,
                                                      model.reserve).items()}
        stages.append(Stage(r, tuple(bounds[c] for c in mine), tuple(dict.fromkeys(groups)),
                            memory, peaks[r]))
    if spmd:
        bandwidth, latency = cluster.link(p, cfg.stage_plan.num_devices)
        sync = (step_sync(model, costs, p) - model.tied_sync
                + latency + 2 * (p - 1) / p * outer.params / bandwidth)
    else:
        sync = step_sync(model, costs, p)
    busy = cfg.m * sum(c.time for c in costs) / p  # the average rank's op time
    return PipelinePlan(p, v, cfg.m, cfg.schedule, cfg.microbatch_size, cfg.stage_plan,
                        tuple(stages), tuple((c.f, c.b, c.w) for c in costs), model.p2p,
                        pipeline_s, sync, 1 - busy / pipeline_s, form=form)
