# ruff: noqa: E402  (XLA reads the device-count flag when jax is first imported)
"""Benchmark of pipeline parallelism (issue 4, item 5): schedules simulated, runtimes timed,
Megatron-LM's table planned.

Three parts, written to one JSON file (default docs/bench_pipeline.json) and printed:

1. Simulated schedules: bubble fraction and rank 0's peak number of stashed microbatch
   chunks of GPipe, 1F1B, ZB-H1 and interleaved 1F1B for p in {4, 8}, m in {8, 16, 32},
   v in {1, 2, 4}, with forward 1 and backward 2 per chunk (ZB-H1: B 1 and W 1), no p2p
   time; a chunk's time is 1 / v of a stage's, so interleaved chunks are v times shorter.
2. Measured on 8 simulated CPU devices: every schedule and form on a GPT whose
   unpipelined dp8 step takes over a second, against that unpipelined plan doing the same
   work (the same batch; neither form recomputes the forward in the backward).
   Steps are timed in interleaved rounds, median per configuration.
3. Megatron-LM's table (data/megatron_gpt_configs.csv, 1.7B ... 1T on 32 ... 3072
   A100-80GB): the pipeline planner's pick and the paper's own (t, p, d), both priced by
   the same cost model (mixed precision, efficiency 1.0, so absolute TFLOP/s are
   optimistic: compare ratios), in model and hardware TFLOP/s per GPU, with the planning
   time of each row.

    python scripts/bench_pipeline.py                  # full: about 10 minutes on 2 cores
    python scripts/bench_pipeline.py --quick --out /tmp/bench.json   # CI smoke
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import optax

import jaxpar
from jaxpar.cluster.probe import example_batch
from jaxpar.models import gpt
from jaxpar.named import named_plan
from jaxpar.plan import Pipeline
from jaxpar.planners.cluster import a100_80gb
from jaxpar.planners.megatron import MIXED, megatron_table, paper_step, row_graph
from jaxpar.planners.pipeline.result import step_flops
from jaxpar.planners.pipeline.search import plan_pipeline
from jaxpar.planners.schedules.generators import make_schedule, schedule_allows
from jaxpar.planners.schedules.simulator import simulate
from jaxpar.report import run_meta, text_table, write_result
from jaxpar.timing import Timed, interleave

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_CSV = ROOT / "data" / "megatron_gpt_configs.csv"
NUM_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Settings:
    model: dict[str, int]
    batch: int
    pipelines: tuple[tuple[str, str, int, int, str], ...]  # (form, schedule, v, m, spec)
    rounds: int
    steps_per_round: int
    megatron_rows: int | None  # None: every row


FULL = Settings(
    model=dict(vocab=256, length=128, embed=256, heads=8, layers=8), batch=32,
    pipelines=tuple((form, schedule, v, 8, "pp4+dp2")
                    for form in ("mpmd", "spmd")
                    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2),
                                        ("zero_bubble_h1", 1)))
    + (("mpmd", "1f1b", 1, 8, "pp8"), ("spmd", "1f1b", 1, 8, "pp8")),
    rounds=5, steps_per_round=2, megatron_rows=None)
QUICK = Settings(
    model=dict(vocab=64, length=8, embed=16, heads=2, layers=4), batch=16,
    pipelines=(("mpmd", "1f1b", 1, 4, "pp2+dp4"), ("spmd", "1f1b", 1, 4, "pp2+dp4")),
    rounds=2, steps_per_round=1, megatron_rows=1)


# ================================================================ 1. simulated schedules
def simulated() -> list[dict]:
    rows = []
    for p in (4, 8):
        for m in (8, 16, 32):
            for name, v in (("gpipe", 1), ("1f1b", 1), ("zero_bubble_h1", 1),
                            ("interleaved_1f1b", 2), ("interleaved_1f1b", 4)):
                if not schedule_allows(name, p, m, v):
                    continue
                split = name == "zero_bubble_h1"
                result = simulate(make_schedule(name, p, m, v), 1 / v,
                                  (1 if split else 2) / v, (1 if split else 0) / v, 0.0)
                rows.append({"p": p, "m": m, "v": v, "schedule": name,
                             "bubble": result.bubble_fraction,
                             "step": result.step_time,
                             "peak_stash_rank0": result.peak_stash[0]})
    return rows


# ================================================================ 2. measured runtimes
def build_run(name: str, plan: jaxpar.Plan, settings: Settings) -> tuple[Timed, float]:
    """Compile `plan` on the settings' model; (its clock after one warm-up step, compile
    seconds)."""
    model_fn = gpt.build(gpt.GPTConfig(**settings.model))
    host = example_batch(gpt.GPTConfig(**settings.model), settings.batch)
    start = time.perf_counter()
    par = jaxpar.parallelize(model_fn, optax.adamw(1e-3), gpt.lm_stages, plan, host)
    clock = Timed(name, par.step, par.init(jax.random.key(0)), par.shard_batch(host))
    clock.warm_up()
    return clock, time.perf_counter() - start


def measured(settings: Settings) -> dict:
    plans = {"dp8": named_plan("dp8", NUM_DEVICES)}
    for form, schedule, v, m, spec in settings.pipelines:
        name = f"{form} {schedule}{f' v{v}' if v > 1 else ''} m{m} {spec}"
        plans[name] = named_plan(spec, NUM_DEVICES, microbatches=m,
                                 remat="dots" if form == "spmd" else "none",
                                 pipeline=Pipeline(schedule, v, form))
    runs, compile_s = [], {}
    for name, plan in plans.items():
        print(f"compiling {name}", file=sys.stderr, flush=True)
        run, compile_s[name] = build_run(name, plan, settings)
        runs.append(run)
    interleave(runs, settings.rounds, settings.steps_per_round)
    median = {run.name: run.median() for run in runs}
    configs = []
    for run in runs:
        form = run.name.split()[0] if run.name.split()[0] in ("mpmd", "spmd") else None
        baseline = None if form is None else "dp8"
        configs.append({
            "name": run.name, "form": form, "median_s": median[run.name],
            "spread": run.spread(),
            "steps": len(run.times), "times_s": run.times, "compile_s": compile_s[run.name],
            "baseline": baseline,
            "over_baseline": None if baseline is None else median[run.name] / median[baseline]})
    return {"model": settings.model, "batch": settings.batch, "configs": configs}


# ================================================================ 3. Megatron-LM's table
def megatron(settings: Settings) -> list[dict]:
    rows = megatron_table(MEGATRON_CSV)
    out = []
    for row in rows[:settings.megatron_rows] if settings.megatron_rows else rows:
        graph = row_graph(row)
        cluster = a100_80gb(row["gpus"] // 8)
        start = time.process_time()
        plan = plan_pipeline(graph, cluster, options=MIXED)
        plan_s = time.process_time() - start
        pick, step, remat = plan.name, plan.predicted.step_s, plan.remat
        paper = paper_step(graph, cluster, row)
        flops = {"pick": step_flops(graph, remat), "paper": step_flops(graph, "full")}
        per = {k: 1e12 * row["gpus"] * s for k, s in (("pick", step), ("paper", paper))}
        out.append({
            "model": f"{row['params_billion']}B", "gpus": row["gpus"],
            "batch": row["global_batch"], "paper": f"t{row['t']} p{row['p']} "
            f"d{row['gpus'] // (row['t'] * row['p'])}", "pick": pick, "plan_s": plan_s,
            "pick_step_s": step, "paper_step_s": paper,
            "pick_model_tflops": flops["pick"][0] / per["pick"],
            "pick_hardware_tflops": flops["pick"][1] / per["pick"],
            "paper_model_tflops": flops["paper"][0] / per["paper"],
            "paper_hardware_tflops": flops["paper"][1] / per["paper"],
            "bubble": plan.pipeline.bubble if plan.pipeline else 0.0})
    return out


# ================================================================ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run for CI")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_pipeline.json")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if jax.device_count() != NUM_DEVICES:
        raise SystemExit(f"need {NUM_DEVICES} devices, found {jax.device_count()}; "
                         f"set XLA_FLAGS={_FLAG}={NUM_DEVICES}")
    started = time.perf_counter()
    result: dict[str, Any] = {"meta": {
        **run_meta("scripts/bench_pipeline.py"), "quick": args.quick,
        "timing": f"1 warm-up step, {settings.rounds} interleaved rounds x "
                  f"{settings.steps_per_round} steps in shuffled order (jaxpar.timing); median "
                  "of the clean steps per configuration (all, if none is clean); spread = "
                  "IQR / median"}}

    print("== simulated schedules (F = 1, B = 2; ZB-H1 B = W = 1; per stage)")
    result["simulated"] = simulated()
    print(text_table(["p", "m", "v", "schedule", "bubble", "rank-0 stash"],
                     [[r["p"], r["m"], r["v"], r["schedule"], f"{r['bubble']:.1%}",
                       r["peak_stash_rank0"]] for r in result["simulated"]]))

    print("\n== Megatron-LM table, planned (A100-80GB, mixed precision, efficiency 1.0)")
    result["megatron"] = megatron(settings)
    print(text_table(["model", "GPUs", "paper", "pick", "plan s", "pick TF/s model/hw",
                      "paper TF/s model/hw", "pick/paper"],
                     [[r["model"], r["gpus"], r["paper"], r["pick"], f"{r['plan_s']:.2f}",
                       f"{r['pick_model_tflops']:.0f}/{r['pick_hardware_tflops']:.0f}",
                       f"{r['paper_model_tflops']:.0f}/{r['paper_hardware_tflops']:.0f}",
                       f"{r['pick_step_s'] / r['paper_step_s']:.2f}"]
                      for r in result["megatron"]]))

    print("\n== measured, 8 CPU devices", flush=True)
    result["measured"] = measured(settings)
    print(text_table(["config", "median s", "spread", "vs unpipelined", "compile s"],
                     [[c["name"], c["median_s"], f"{c['spread']:.1%}",
                       "-" if c["baseline"] is None else
                       f"{c['over_baseline']:.2f}x {c['baseline']}", c["compile_s"]]
                      for c in result["measured"]["configs"]]))

    result["targets"] = targets(result)
    write_result(result, args.out, time.perf_counter() - started)
    return result


def targets(result: dict) -> dict:
    """The issue's bars, checked on this run's figures."""
    pipelined = [c for c in result["measured"]["configs"] if c["baseline"]]
    baseline = {c["name"]: c["median_s"] for c in result["measured"]["configs"]}
    rows = result["megatron"]
    return {
        "unpipelined_step_s": baseline["dp8"],
        "max_pipelined_over_unpipelined": max(c["over_baseline"] for c in pipelined),
        "within_1.25x": all(c["over_baseline"] <= 1.25 for c in pipelined),
        "max_megatron_plan_s": max(r["plan_s"] for r in rows),
        "megatron_plan_under_10s": all(r["plan_s"] < 10 for r in rows),
        "pick_at_least_as_fast_as_paper": all(r["pick_step_s"] <= r["paper_step_s"] * (1 + 1e-9)
                                              for r in rows)}


if __name__ == "__main__":
    main()
