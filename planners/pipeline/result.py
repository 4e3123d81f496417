"""A priced pipeline: its ranks, their memory and its step in each form, and the Plan it
becomes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jaxpar.pipelining import FORMS
from jaxpar.plan import Alternative, Pipeline, Plan, Predicted
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
from jaxpar.planners.schedules.ticks import lockstep_time
from jaxpar.planners.sharding.search import describe


@dataclasses.dataclass(frozen=True)
class PricedPipeline(Candidate):
    """The search's record of one priced pipeline (`to_plan()` is what leaves the planner):
    p stages of `stage_plan` (one intra-stage sharding for every stage; all stages run the
    same layer program), v chunks per rank, m microbatches of `microbatch_size` per
    replica, the schedule; the chunks' layer ranges (chunk c on rank c mod p), each rank's
    per-device memory by category; the pipeline time and bubble in the chosen `form`, the
    gradient sync once per step; `forms` the step of every form priced.
    `stage_plan.microbatches` is 1: a stage program runs one microbatch at a time; m is the
    pipeline's."""

    chunks: tuple[tuple[int, int], ...]
    stage_memory: tuple[dict[str, float], ...]
    pipeline_s: float
    sync_s: float
    bubble_fraction: float
    form: str = "mpmd"
    forms: tuple[tuple[str, float, float], ...] = ()  # (form, step_s, memory_bytes) priced

    @property
    def step_s(self) -> float:
        return self.pipeline_s + self.sync_s

    @property
    def memory_bytes(self) -> float:
        """The largest rank's per-device bytes: what must fit the budget."""
        return max(sum(m.values()) for m in self.stage_memory)

    def to_plan(self, source: str = "", alternatives: Sequence[Alternative] = ()) -> Plan:
        """The Plan the emitter runs: a `stage` axis of p before the stage mesh, the cut as
        layers per chunk, the schedule, form and predicted bubble; predicted memory is the
        largest rank's (every rank's in `stage_bytes`), its compute the pipeline in its form
        (bubble and p2p included), its communication the gradient sync after the flush and
        `forms` every form's step; `alternatives` are the runners-up."""
        stage = self.stage_plan
        worst = max(self.stage_memory, key=lambda m: sum(m.values()))
        predicted = Predicted(worst, self.pipeline_s, self.sync_s, {}, source, None,
                              forms={form: step for form, step, _ in self.forms},
                              stage_bytes=tuple(sum(m.values()) for m in self.stage_memory))
        return dataclasses.replace(
            stage, mesh=(("stage", self.p),) + stage.mesh, microbatches=self.m,
            name=self.name, predicted=predicted,
            alternatives=tuple(alternatives),
            pipeline=Pipeline(self.schedule, self.v, self.form,
                              tuple(j - i for i, j in self.chunks), self.bubble_fraction))


def step_flops(graph: ModelGraph, remat: str) -> tuple[float, float]:
    """(model, hardware) FLOPs of a step: 3 x forward, plus the stack's recomputed forward
    under full remat (Megatron-LM's 'with recomputation' count; "dots" recomputes no
    matmul)."""
    model = 3 * graph.flops_fwd
    recomputed = sum(g.flops_fwd * g.repeat for g in graph.groups if g.repeat > 1)
    return model, model + (recomputed if remat == "full" else 0.0)


def finish(pricer: Pricer, cfg: Candidate, model: PieceCosts, bounds: Sequence[tuple[int, int]],
           budget: float = math.inf, forms: Sequence[str] = FORMS) -> PricedPipeline | None:
    """Price the cut in each of `forms` and keep the faster that fits `budget` (the faster of
    all if neither does; None if no form can run it). MPMD: the simulated schedule, or the
    host launching its ops one by one if that takes longer. SPMD (equal chunks and ZeRO 0
    only, as its runtime needs): the tick table in lock-step, every rank holding the
    parameters outside the stack and all-reducing their gradient over `stage`, on
    `spmd_stage` of the candidate's stage plan."""
    priced = [_form(pricer, cfg, model, bounds, "mpmd")] if "mpmd" in forms else []
    chunks = cfg.p * cfg.v
    layers = pricer.parts.layers
    stage = spmd_stage(cfg.stage_plan)
    if "spmd" in forms and stage is not None and layers % chunks == 0:
        k = layers // chunks
        spmd = dataclasses.replace(cfg, stage_plan=stage)
        priced.append(_form(pricer, spmd, pricer.model(cfg.p, stage, cfg.microbatch_size),
                            [(c * k, (c + 1) * k) for c in range(chunks)], "spmd"))
    if not priced:
        return None
    fitting = [plan for plan in priced if plan.memory_bytes <= budget] or priced
    best = min(fitting, key=lambda plan: plan.step_s)
    forms = tuple((plan.form, plan.step_s, plan.memory_bytes) for plan in priced)
    return dataclasses.replace(best, forms=forms)


def spmd_stage(stage: Plan) -> Plan | None:
    """The stage plan the SPMD form runs for `stage`: None under ZeRO-1 (its optimizer state
    stays laid out like the parameters); remat "dots" for "none" (it keeps matmul outputs
    at most, `jaxpar.emit.spmd`), else `stage` itself."""
    if stage.zero:
        return None
    if stage.remat != "none":
        return stage
    dots = dataclasses.replace(stage, remat="dots")
    return dataclasses.replace(dots, name=describe(dots))


def _form(pricer: Pricer, cfg: Candidate, model: PieceCosts,
          bounds: Sequence[tuple[int, int]], form: str) -> PricedPipeline:
    """The cut priced in one form; each rank's memory laid out."""
    p, v = cfg.p, cfg.v
    costs = chunk_costs(model, bounds)
    schedule = make_schedule(cfg.schedule, p, cfg.m, v)
    f, b, w = ([c.f for c in costs], [c.b for c in costs], [c.w for c in costs])
    cluster = pricer.cluster
    spmd = form == "spmd"
    if spmd:
        pipeline_s = lockstep_time(schedule, f, b, w, model.p2p) + cluster.dispatch_latency
    else:
        # the driver launches every op, and a device_put for each activation and gradient
        # that moves to the next chunk's stage
        launches = sum(map(len, schedule.ops)) + 2 * cfg.m * (p * v - 1)
        pipeline_s = max(simulate(schedule, f, b, w, model.p2p).step_time,
                         launches * cluster.dispatch_latency)
    outer = model.first + model.last  # SPMD: replicated over `stage`, on every rank
    lives = [live_bytes(schedule.ops[r], [c.stash for c in costs], [c.extra for c in costs],
                        schedule.splits_backward) for r in range(p)]
    memories = []
    for r in range(p):
        mine = range(r, p * v, p)
        rank = sum((costs[c] for c in mine), Cost())
        if spmd and 0 not in mine:
            rank = rank + dataclasses.replace(Cost(), params=outer.params, grads=outer.grads,
                                               optimizer=outer.optimizer)
        live = max(lives) if spmd else lives[r]  # SPMD buffers: the busiest rank's slots
        memories.append({k: float(x) for k, x in rank_memory(rank, live, model.batch,
                                                             model.reserve).items()})
    if spmd:
        bandwidth, latency = cluster.link(p, cfg.stage_plan.num_devices)
        sync = (step_sync(model, costs, p) - model.tied_sync
                + latency + 2 * (p - 1) / p * outer.params / bandwidth)
    else:
        sync = step_sync(model, costs, p)
    busy = cfg.m * sum(c.time for c in costs) / p  # the average rank's op time
    return PricedPipeline(p, v, cfg.m, cfg.schedule, cfg.microbatch_size, cfg.stage_plan,
                          tuple(bounds), tuple(memories), pipeline_s, sync,
                          1 - busy / pipeline_s, form=form)
