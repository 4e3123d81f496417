"""The planner benchmark's measured sweep (scripts/bench_planner.py, part 1).

Per case (GPT size x batch x sequence) the planner picks a plan; then every mesh shape
data x fsdp x tensor is compiled and timed with the pick's remat, microbatches and ZeRO
level, under every subset of the large layer groups kept whole instead of split over
`fsdp` (each distinct program once), plus a second copy of the pick as a control of the
noise, with `jaxpar.timing`'s interleaved, contention-watched rounds; the configs near the
best then race for more steps. Recorded: predicted and measured time of each config, the
pick, the best, their ratio, Spearman's rank correlation, predicted vs compiled memory.
"""

import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import optax
from scipy.stats import spearmanr

import jaxpar
from jaxpar.cluster.probe import example_batch, random_state
from jaxpar.models.gpt import build, lm_loss
from jaxpar.models.presets import GPTConfig
from jaxpar.plan import ParamInfo, Plan, PlanError
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.cost import predict
from jaxpar.planners.graph import ModelGraph
from jaxpar.planners.sharding.search import (
    cheapest_grad_reduce,
    describe,
    group_pattern,
    mesh_shapes,
    pattern_group,
    plan_sharding,
    replicate_over_fsdp,
)
from jaxpar.timing import Timed, no_collector, visit
from jaxpar.tracing.graph import trace_graph

NUM_DEVICES = 8


# ================================================================ settings and cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One measured-sweep case: a GPT config and the batch it trains on."""

    name: str
    cfg: GPTConfig
    batch: int

    @property
    def length(self) -> int:
        return self.cfg.length


def _gpt(embed: int, layers: int, length: int, vocab: int) -> GPTConfig:
    return GPTConfig(vocab=vocab, length=length, embed=embed, heads=8, layers=layers)


FULL_CASES = (
    Case("e128-l2 b16 s128", _gpt(128, 2, 128, 512), 16),   # activations dominate
    Case("e128-l4 b16 s64", _gpt(128, 4, 64, 512), 16),     # deeper, shorter sequences
    Case("e256-l2 b8 s64", _gpt(256, 2, 64, 2048), 8),      # big vocabulary
    Case("e512-l2 b8 s32", _gpt(512, 2, 32, 1024), 8),      # parameters dominate
)
QUICK_CASES = (Case("e32-l1 b8 s16", _gpt(32, 1, 16, 128), 8),)


@dataclasses.dataclass(frozen=True)
class Settings:
    cases: tuple[Case, ...]
    rule_sets: str  # "subsets" or "sharded", see rule_variants()
    rounds: int  # interleaved rounds over every config
    steps_per_round: int
    min_clean: int  # steps per config timed with the other processes quiet, if time allows
    timing_budget_s: float  # per case: extra rounds for configs short of clean steps
    race_samples: int  # steps per contender for the best (0: no race)
    race_budget_s: float  # per case
    quiet_wait_s: float  # per visit: how long to wait for the other processes to go quiet
    planning_nodes: tuple[int, ...]
    megatron_rows: int | None  # None: every pipeline-free row
    meshes: tuple[tuple[int, int, int], ...] | None = None  # data, fsdp, tensor; None: all


FULL = Settings(FULL_CASES, "subsets", rounds=6, steps_per_round=2, min_clean=10,
                timing_budget_s=100.0, race_samples=60, race_budget_s=100.0, quiet_wait_s=5.0,
                planning_nodes=(128, 512), megatron_rows=None)
QUICK = Settings(QUICK_CASES, "sharded", rounds=1, steps_per_round=3, min_clean=3,
                 timing_budget_s=0.0, race_samples=0, race_budget_s=0.0, quiet_wait_s=0.0,
                 planning_nodes=(128,), megatron_rows=1,
                 meshes=((8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)))


# ================================================================ configs
# Rule sets: which layer groups keep their parameters whole instead of split over `fsdp`.
# Every subset of the large groups (LARGE_GROUP of the parameter bytes or more) is swept;
# small groups (position table, final norm) follow the largest group, since their choice
# only makes near-ties. Plans that compile to the same program are swept once: a mesh whose
# fsdp axis holds no parameter is the data-parallel mesh of data x fsdp devices.
LARGE_GROUP = 0.05


def rule_variants(graph: ModelGraph, mode: str) -> list[tuple[str, ...]]:
    """The sets of groups to replicate over fsdp: mode "subsets" as above; "sharded": none."""
    if mode == "sharded":
        return [()]
    total = graph.param_bytes
    large = [g.name for g in graph.groups if g.param_bytes >= LARGE_GROUP * total]
    small = tuple(g.name for g in graph.groups if g.name not in large)
    largest = max(graph.groups, key=lambda g: g.param_bytes).name
    return [subset + (small if largest in subset else ())
            for k in range(len(large) + 1) for subset in itertools.combinations(large, k)]


def sweep_plans(graph: ModelGraph, pick: Plan, settings: Settings,
                cluster: Cluster) -> list[Plan]:
    """The pick, then every mesh shape (or those of `settings.meshes`) under every rule
    variant, with the pick's remat, microbatches and ZeRO level and the gradient reduction
    the planner prices best for it; plans that fail the plan checks are skipped, and each
    program is kept once."""
    candidates = [pick]
    for mesh in mesh_shapes(NUM_DEVICES):
        if settings.meshes and tuple(size for _, size in mesh) not in settings.meshes:
            continue
        base = Plan(mesh=mesh, rules=pick.rules, zero=pick.zero, remat=pick.remat,
                    microbatches=pick.microbatches)
        variants = rule_variants(graph, settings.rule_sets) if base.axis_size("fsdp") > 1 else [()]
        for replicated in variants:
            rules = tuple((group_pattern(g), replicate_over_fsdp(pick.rules)) for g in replicated)
            candidates.append(dataclasses.replace(base, group_rules=rules))
    plans, seen = [], set()
    for plan in candidates:
        try:
            plan = plan.bind(graph.params)
            plan.check_batch(graph.batch_size)
        except PlanError:
            continue
        if plan is not pick:
            plan = cheapest_grad_reduce(graph, plan, cluster)
        if program_key(plan) not in seen:
            seen.add(program_key(plan))
            plans.append(dataclasses.replace(plan, name=config_name(plan, graph)))
    return plans


def uses_fsdp(plan: Plan, params: Sequence[ParamInfo]) -> bool:
    return any("fsdp" in sum(plan.param_layout(p), ()) for p in params)


def program_key(plan: Plan) -> tuple:
    """Equal for plans that compile to the same program: mesh, knobs and every parameter's
    layout, with an fsdp axis that no parameter uses folded into `data`."""
    if plan.axis_size("fsdp") > 1 and not uses_fsdp(plan, plan.params):
        mesh = (("data", plan.axis_size("data") * plan.axis_size("fsdp")), ("fsdp", 1),
                ("tensor", plan.axis_size("tensor")))
        plan = dataclasses.replace(plan, mesh=mesh, group_rules=())
    return (plan.mesh, plan.zero, plan.remat, plan.microbatches,
            plan.grad_reduce if uses_fsdp(plan, plan.params) else None,
            tuple(sorted((p.path, plan.param_layout(p)) for p in plan.params)))


def config_name(plan: Plan, graph: ModelGraph) -> str:
    """describe() of the mesh and knobs, then the groups whose parameters stay whole, read
    from the layouts themselves."""
    name = describe(dataclasses.replace(plan, group_rules=()))
    if plan.axis_size("fsdp") == 1:
        return name
    whole = [g.name for g in graph.groups if not uses_fsdp(plan, g.params)]
    return f"{name} ({','.join(whole)} unsharded)" if whole else name


# ================================================================ timing
RACE_MARGIN = 0.15


@dataclasses.dataclass
class Run:
    """One compiled config: its plan, compile seconds, compiled memory and its clock."""

    plan: Plan
    compile_s: float
    memory: dict[str, float]
    clock: Timed


def compile_run(case: Case, plan: Plan, host_batch: dict) -> Run:
    """Lay out and compile `plan`, create its state, and run one warm-up step."""
    par = jaxpar.parallelize(build(case.cfg), optax.adamw(1e-3), lm_loss, plan, host_batch)
    batch = par.shard_batch(host_batch)
    start = time.perf_counter()
    compiled = par.lower(batch).compile()
    compile_s = time.perf_counter() - start
    m = compiled.memory_analysis()
    memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
              "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes}
    clock = Timed(par.plan.name, compiled, random_state(par), batch).warm_up()
    return Run(par.plan, compile_s, memory, clock)


def time_rounds(runs: list[Run], settings: Settings, seed: int) -> int:
    """Interleaved timing in two phases; returns the number of rounds.

    1. Every config, `rounds` rounds; then more rounds for configs with fewer than
       `min_clean` clean steps, while the case's timing budget lasts.
    2. Race: the configs within RACE_MARGIN of the fastest so far, the pick and its
       control get rounds until each has `race_samples` steps or the race budget is spent,
       so the decision that matters (is the pick within 10 % of the best?) does not rest
       on a dozen noisy steps; the minimum of many noisy medians is biased low.
    """
    clocks = [r.clock for r in runs]
    rng = np.random.default_rng(seed)
    rounds = 0
    with no_collector():
        deadline = time.perf_counter() + settings.timing_budget_s
        while True:
            todo = [c for c in clocks if rounds < settings.rounds
                    or len(c.clean) < settings.min_clean]
            if not todo or (rounds >= settings.rounds and time.perf_counter() > deadline):
                break
            visit(todo, settings.steps_per_round, rng, settings.quiet_wait_s, deadline)
            rounds += 1
        deadline = time.perf_counter() + settings.race_budget_s
        while time.perf_counter() < deadline:
            todo = contenders(clocks, settings)
            if not todo:
                break
            visit(todo, settings.steps_per_round, rng, settings.quiet_wait_s, deadline)
            rounds += 1
    return rounds


def contenders(clocks: list[Timed], settings: Settings) -> list[Timed]:
    """Clocks short of `race_samples` steps that are the pick, its control, or within
    RACE_MARGIN of the fastest median so far."""
    medians = [c.median(settings.min_clean) for c in clocks]
    best = min(medians)
    return [c for c, m in zip(clocks, medians) if len(c.samples) < settings.race_samples
            and (c.role or m <= best * (1 + RACE_MARGIN))]


# ================================================================ analysis
def config_record(run: Run, graph: ModelGraph, cluster: Cluster, settings: Settings) -> dict:
    pr = predict(graph, run.plan, cluster)
    every = np.array([t for t, _ in run.clock.samples])
    clean = run.clock.clean
    s = run.clock.timed(settings.min_clean)
    q1, median, q3 = np.percentile(s, [25, 50, 75])
    mem = pr.memory_bytes
    predicted_args = mem.get("params", 0) + mem.get("optimizer", 0) + mem.get("batch", 0)
    compiled_total = run.memory["argument"] + run.memory["temp"]
    return {
        "name": run.plan.name,
        "mesh": dict(run.plan.mesh),
        "unsharded_groups": [pattern_group(p) for p, _ in run.plan.group_rules],
        "is_pick": run.clock.role == "pick", "control": run.clock.role == "control",
        "predicted_s": pr.step_s, "predicted_compute_s": pr.compute_s,
        "predicted_communication_s": pr.communication_s,
        "measured_median_s": float(median), "measured_iqr_rel": float((q3 - q1) / median),
        "measured_min_s": float(every.min()), "samples": len(every),
        "clean_samples": len(clean), "contended": len(clean) < settings.min_clean,
        "median_all_samples_s": float(np.median(every)),
        "median_first_rounds_s": float(np.median(every[:settings.rounds
                                                         * settings.steps_per_round])),
        "samples_s": [float(f"{t:.6g}") for t in every],
        "mean_foreign_cores": float(np.mean([f for _, f in run.clock.samples])),
        "compile_s": run.compile_s,
        "memory": {"predicted_argument": predicted_args, "compiled_argument":
                   run.memory["argument"], "predicted_total": pr.total_bytes,
                   "compiled_argument_plus_temp": compiled_total,
                   "argument_error": predicted_args / run.memory["argument"] - 1,
                   "total_error": pr.total_bytes / compiled_total - 1},
    }


def summarize(configs: list[dict]) -> dict:
    """Pick vs best, rank correlation, noise, and a two-term fit of measured on predicted,
    over the distinct programs (the control copy of the pick only measures the noise)."""
    control = [c["measured_median_s"] for c in configs if c["control"]]
    configs = [c for c in configs if not c["control"]]
    measured = np.array([c["measured_median_s"] for c in configs])
    predicted = np.array([c["predicted_s"] for c in configs])
    comm = np.array([c["predicted_communication_s"] for c in configs])
    compute = np.array([c["predicted_compute_s"] for c in configs])
    pick = next(c for c in configs if c["is_pick"])
    best = configs[int(measured.argmin())]
    noise = float(np.median([c["measured_iqr_rel"] for c in configs]))
    rho, p_value = spearmanr(predicted, measured) if len(configs) > 2 else (math.nan, math.nan)
    tied = [c["name"] for c in configs
            if c["measured_median_s"] <= best["measured_median_s"] * (1 + noise)]
    return {
        "configs": len(configs),
        "pick": pick["name"], "pick_measured_s": pick["measured_median_s"],
        "pick_predicted_s": pick["predicted_s"], "pick_iqr_rel": pick["measured_iqr_rel"],
        "best": best["name"], "best_measured_s": best["measured_median_s"],
        "best_iqr_rel": best["measured_iqr_rel"],
        "ratio": pick["measured_median_s"] / best["measured_median_s"],
        "pick_rank_measured": int((measured < pick["measured_median_s"]).sum()) + 1,
        "spearman": float(rho), "spearman_p": float(p_value),
        "median_iqr_rel": noise, "within_noise_of_best": tied,
        "control_over_pick": control[0] / pick["measured_median_s"] if control else math.nan,
        "measured_over_predicted": float(np.median(measured / predicted)),
        "fit": fit_measured(measured, compute, comm),
        "by_min": view(configs, "measured_min_s"),
        "first_rounds": view(configs, "median_first_rounds_s"),
        "max_abs_argument_error": max(abs(c["memory"]["argument_error"]) for c in configs),
        "max_abs_total_error": max(abs(c["memory"]["total_error"]) for c in configs),
    }


def view(configs: list[dict], key: str) -> dict:
    """Pick / best and rank correlation on another per-config measure of the same runs:
    the fastest step (load from other processes only ever adds time), or the median of the
    first rounds alone (every config timed alike, before the race)."""
    values = np.array([c[key] for c in configs])
    pick = next(c[key] for c in configs if c["is_pick"])
    predicted = [c["predicted_s"] for c in configs]
    rho = spearmanr(predicted, values)[0] if len(configs) > 2 else math.nan
    return {"ratio": float(pick / values.min()),
            "best": configs[int(values.argmin())]["name"], "spearman": float(rho)}


def fit_measured(measured: np.ndarray, compute: np.ndarray, comm: np.ndarray) -> dict:
    """measured ~ a + b * predicted communication, across the configs of one case (their
    predicted compute is nearly equal, so `a` absorbs it): b is how many measured seconds
    one predicted communication second costs (1 if the model were right), a / compute the
    factor by which the rest of the step is slower than predicted."""
    if len(measured) < 3 or np.ptp(comm) == 0:
        return {}
    (b, a), residuals, *_ = np.polyfit(comm, measured, 1, full=True)
    total = ((measured - measured.mean()) ** 2).sum()
    r2 = 1 - float(residuals[0]) / total if len(residuals) and total > 0 else math.nan
    return {"communication_scale": float(b), "intercept_s": float(a),
            "intercept_over_compute": float(a / compute.mean()), "r2": r2}


def sweep_case(case: Case, cluster: Cluster, settings: Settings, seed: int) -> dict:
    """Plan one case, compile every config of the sweep, time them, summarize."""
    host_batch = example_batch(case.cfg, case.batch, seed)
    graph = trace_graph(build(case.cfg), lm_loss, host_batch)
    start = time.perf_counter()
    # microbatches capped so the pick's count divides every mesh shape's local batch
    pick = plan_sharding(graph, cluster, max_microbatches=case.batch // NUM_DEVICES)
    plan_s = time.perf_counter() - start
    plans = sweep_plans(graph, pick, settings, cluster)
    runs = []
    for i, plan in enumerate([*plans, plans[0]]):
        runs.append(compile_run(case, plan, host_batch))
        print(f"  compiled {i + 1}/{len(plans) + 1} {plan.name} ({runs[-1].compile_s:.1f} s)",
              file=sys.stderr, flush=True)
    runs[0].clock.role, runs[-1].clock.role = "pick", "control"  # sweep_plans puts the pick first
    load = os.getloadavg()[0]
    start = time.perf_counter()
    rounds = time_rounds(runs, settings, seed)
    timing_s = time.perf_counter() - start
    load = (load, os.getloadavg()[0])
    if program_key(plans[0]) != program_key(pick):
        raise RuntimeError(f"{case.name}: the pick {pick.name} fails the plan checks")
    configs = [config_record(r, graph, cluster, settings) for r in runs]
    configs.sort(key=lambda c: (c["control"], c["measured_median_s"]))
    return {"case": case.name, "config": dataclasses.asdict(case.cfg), "batch": case.batch,
            "length": case.length, "params": case.cfg.num_params, "plan_s": plan_s,
            "load_average_before_after": load, "rounds": rounds, "timing_s": timing_s,
            "contended_configs": sum(c["contended"] for c in configs),
            "groups": groups_record(graph), "planner_name": pick.name,
            "pick_explain": pick.explain(),
            **summarize(configs), "sweep": configs}


def groups_record(graph: ModelGraph) -> list[dict]:
    total = graph.param_bytes
    return [{"name": g.name, "param_fraction": g.param_bytes / total,
             "large": g.param_bytes >= LARGE_GROUP * total} for g in graph.groups]
