# ruff: noqa: E402  (XLA reads the device-count flag when jax is first imported)
"""Benchmark of the sharding planner against the clock and the literature.

Three parts, written to one JSON file (default docs/bench_planner.json) and printed as tables:

1. Measured sweep, 8 simulated CPU devices, the calibrated CPU cluster
   (scripts/planner_sweep.py): per case the planner's pick against every mesh shape and
   rule variant, timed in interleaved rounds (jaxpar.timing); pick / best, Spearman's rank
   correlation of predicted and measured, predicted vs compiled memory.
2. Planning time of GPT-3 175B (batch 1536, sequence 2048) on 1024 and 4096 A100-80GB.
3. Predicted throughput for the pipeline-free rows of the Megatron-LM paper (Narayanan et
   al., SC'21, Table 1; data/megatron_gpt_configs.csv): the planner's pick, plain dp, fsdp
   and tp (dp+tp8), and the paper's own (t, d), in model and hardware TFLOP/s per GPU, on
   the same analytic mixed-precision graph and cost options as the pipeline benchmark
   (`planners.megatron.MIXED`: the A100's datasheet peak, efficiency 1.0, so absolute
   TFLOP/s are optimistic: compare ratios).

jaxpar's step against its peers (the hand-written program, MaxText) is scripts/bench_peers.py.

    python scripts/bench_planner.py                  # full: about 25 minutes on 2 cores
    python scripts/bench_planner.py --quick --out /tmp/bench.json   # CI smoke
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from planner_sweep import FULL, LARGE_GROUP, QUICK, RACE_MARGIN, sweep_case

import jaxpar
from jaxpar.cluster.calibration import load_measurements
from jaxpar.models.gpt import build, lm_loss
from jaxpar.models.presets import preset
from jaxpar.named import named_plan
from jaxpar.plan import REMAT, Plan, Predicted
from jaxpar.planners.cluster import Cluster, a100_80gb
from jaxpar.planners.cost import Options, predict
from jaxpar.planners.graph import ModelGraph
from jaxpar.planners.megatron import MIXED, megatron_table, row_graph
from jaxpar.planners.pipeline.result import step_flops
from jaxpar.planners.sharding.search import (
    describe,
    divisors,
    plan_sharding,
)
from jaxpar.report import run_meta, text_table, write_result
from jaxpar.timing import QUIET_CORES
from jaxpar.tracing.graph import trace_graph

ROOT = Path(__file__).resolve().parents[1]
MEGATRON_CSV = ROOT / "data" / "megatron_gpt_configs.csv"
GiB = 2**30
NUM_DEVICES = 8
PARTS = ("planning", "megatron", "sweep")


def abstract_batch(batch: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((batch, length), jnp.int32) for k in ("inputs", "targets")}


def tflops(graph: ModelGraph, step_s: float, devices: int, remat: str) -> dict:
    """Model TFLOP/s per device (3 x forward) and hardware TFLOP/s (plus the stack's
    recomputed forward under full remat, as Megatron-LM counts): `step_flops`, as the pipeline
    benchmark."""
    model, hardware = step_flops(graph, remat)
    per = step_s * devices * 1e12
    return {"model_tflops": model / per, "hardware_tflops": hardware / per}


# ================================================================ 2. planning time, GPT-3 175B
def planning_time(nodes: int, options: Options) -> dict:
    """Trace GPT-3 175B (batch 1536, sequence 2048) and plan it on `nodes` DGX A100 nodes;
    wall and process (CPU, all threads) seconds of each step."""
    cfg = preset("gpt3-175b")  # sequence 2048
    cluster = a100_80gb(nodes)
    wall, cpu = time.perf_counter(), time.process_time()
    graph = trace_graph(build(cfg), lm_loss, abstract_batch(1536, 2048))
    trace_wall, trace_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    plan = plan_sharding(graph, cluster, options=options)
    plan_wall, plan_cpu = time.perf_counter() - wall, time.process_time() - cpu
    pr = plan.predicted
    return {"model": "gpt3-175b", "batch": 1536, "length": 2048, "devices": cluster.num_devices,
            "nodes": nodes, "trace_wall_s": trace_wall, "trace_process_s": trace_cpu,
            "plan_wall_s": plan_wall, "plan_process_s": plan_cpu,
            "total_wall_s": trace_wall + plan_wall, "total_process_s": trace_cpu + plan_cpu,
            "plan": plan.name, "mesh": dict(plan.mesh), "gap": pr.gap,
            "predicted_step_s": pr.step_s, "predicted_compute_s": pr.compute_s,
            "predicted_communication_s": pr.communication_s,
            "predicted_memory_gib": pr.total_bytes / GiB,
            **tflops(graph, pr.step_s, cluster.num_devices, plan.remat)}


# ================================================================ 3. Megatron-LM throughput
def best_knobs(graph: ModelGraph, base: Plan, cluster: Cluster,
               remat_choices: Sequence[str] = REMAT) -> tuple[Plan, Predicted, bool]:
    """`base` with the fastest remat policy / microbatch setting (<= 16, as the planner) that fits
    the device memory; if none fits, the one with the least memory, marked not fitting."""
    local = graph.batch_size // base.data_parallel_size
    candidates = []
    for remat in remat_choices:
        for m in (d for d in divisors(local) if d <= 16):
            plan = dataclasses.replace(base, remat=remat, microbatches=m).bind(graph.params)
            candidates.append((plan, predict(graph, plan, cluster, MIXED)))
    fitting = [c for c in candidates if c[1].total_bytes <= cluster.memory_bytes]
    if fitting:
        return *min(fitting, key=lambda c: c[1].step_s), True
    return *min(candidates, key=lambda c: c[1].total_bytes), False


def megatron_row(row: dict) -> dict:
    """Predicted throughput of the pick, dp, fsdp, tp (dp+tp8) and the paper's (t, d)."""
    gpus, t = row["gpus"], row["t"]
    cluster = a100_80gb(gpus // 8)
    graph = row_graph(row)
    start = time.perf_counter()
    pick = plan_sharding(graph, cluster, options=MIXED)
    plan_s = time.perf_counter() - start
    paper = named_plan(f"dp{gpus // t}+tp{t}" if t > 1 else f"dp{gpus}", gpus)
    entries = {"planner": (pick, pick.predicted, True)}
    for label, spec in (("dp", "dp"), ("fsdp", "fsdp"), ("tp", "dp+tp8")):
        entries[label] = best_knobs(graph, named_plan(spec, gpus), cluster)
    entries["paper (t, d)"] = best_knobs(graph, paper, cluster, ("full",))
    plans = {}
    for label, (plan, pr, fits) in entries.items():
        plans[label] = {"plan": describe(plan), "fits": fits, "step_s": pr.step_s,
                        "compute_s": pr.compute_s, "communication_s": pr.communication_s,
                        "memory_gib": pr.total_bytes / GiB, "remat": plan.remat,
                        "microbatches": plan.microbatches,
                        **tflops(graph, pr.step_s, gpus, plan.remat)}
    return {"model": f"{row['params_billion']}B",
            "params": sum(math.prod(p.shape) for p in graph.params), "gpus": gpus,
            "global_batch": row["global_batch"], "paper_t": t, "paper_d": gpus // t,
            "plan_s": plan_s, "plans": plans}


# ================================================================ printing
def print_sweep(cases: list[dict]) -> None:
    rows = [[c["case"], c["configs"], c["pick"], c["best"], f"{c['ratio']:.3f}x",
             f"{c['median_iqr_rel']:.1%}", f"{c['control_over_pick'] - 1:+.1%}",
             f"{c['spearman']:.2f}", f"{c['fit'].get('communication_scale', math.nan):.1f}"]
            for c in cases]
    print(text_table(["case", "programs", "pick", "measured best", "pick/best", "spread",
                      "control", "spearman", "comm x"], rows))


def print_planning(entries: list[dict]) -> None:
    rows = [[e["devices"], f"{e['total_wall_s']:.2f}", f"{e['total_process_s']:.2f}",
             e["plan"], f"{e['predicted_step_s']:.1f}", f"{e['predicted_memory_gib']:.1f}",
             f"{e['model_tflops']:.0f}"] for e in entries]
    print(text_table(["devices", "wall s", "cpu s", "plan", "step s", "GiB", "TFLOP/s"], rows))


def print_megatron(rows: list[dict]) -> None:
    out = []
    for r in rows:
        for label, p in r["plans"].items():
            fit = "" if p["fits"] else f" (needs {p['memory_gib']:.0f} GiB)"
            out.append([f"{r['model']}/{r['gpus']}", label, p["plan"] + fit,
                        f"{p['step_s']:.2f}", f"{p['model_tflops']:.0f}",
                        f"{p['hardware_tflops']:.0f}", f"{p['memory_gib']:.1f}"])
    print(text_table(["model/GPUs", "plan", "layout", "step s", "model TF/s", "hw TF/s",
                      "GiB"], out))


# ================================================================ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run for CI")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_planner.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", action="append", default=[], metavar="NAME",
                        help="sweep only the cases whose name contains NAME (repeatable)")
    parser.add_argument("--part", action="append", choices=PARTS, metavar="PART",
                        help=f"run only this part, one of {', '.join(PARTS)} (repeatable; "
                             "default: all)")
    args = parser.parse_args(argv)
    parts = args.part or PARTS
    settings = QUICK if args.quick else FULL
    if args.case:
        chosen = tuple(c for c in settings.cases if any(n in c.name for n in args.case))
        settings = dataclasses.replace(settings, cases=chosen)
        if not chosen:
            raise SystemExit(f"no case matches {args.case}")
    if jax.device_count() != NUM_DEVICES:
        raise SystemExit(f"need {NUM_DEVICES} devices, found {jax.device_count()}; "
                         f"set XLA_FLAGS={_FLAG}={NUM_DEVICES}")
    started = time.perf_counter()
    result: dict[str, Any] = {"meta": {**meta(args, settings), "parts": list(parts)}}

    # pure planning first (seconds, no devices), then the measured parts (minutes)
    if "planning" in parts:
        print("== planning time, GPT-3 175B", flush=True)
        result["planning"] = [planning_time(n, Options()) for n in settings.planning_nodes]
        print_planning(result["planning"])
    if "megatron" in parts:
        megatron(result, settings)
    if "sweep" in parts:
        sweep(result, settings, args.seed)
    result["targets"] = targets(result)
    write_result(result, args.out, time.perf_counter() - started)
    return result


def megatron(result: dict, settings) -> None:
    print("\n== predicted throughput, Megatron-LM pipeline-free rows", flush=True)
    rows = [r for r in megatron_table(MEGATRON_CSV) if r["p"] == 1]
    rows = rows[:settings.megatron_rows] if settings.megatron_rows else rows
    result["megatron"] = {"source": str(MEGATRON_CSV.relative_to(ROOT)),
                          "options": dataclasses.asdict(MIXED), "cluster": "a100_80gb",
                          "rows": [megatron_row(r) for r in rows]}
    print_megatron(result["megatron"]["rows"])


def sweep(result: dict, settings, seed: int) -> None:
    print("\n== measured sweep, 8 CPU devices", flush=True)
    cluster = jaxpar.calibrate()
    result["meta"]["cpu_cluster"] = dataclasses.asdict(cluster)
    record = load_measurements()
    result["meta"]["cpu_calibration"] = {
        "isolated_cluster": record["isolated_cluster"], "seconds": record["seconds"],
        **{k: record["step_fit"][k] for k in ("scales", "median_relative_error", "spearman")}}
    result["sweep"] = []
    for case in settings.cases:
        print(f"case {case.name}", file=sys.stderr, flush=True)
        result["sweep"].append(sweep_case(case, cluster, settings, seed))
    print_sweep(result["sweep"])


def meta(args: argparse.Namespace, settings) -> dict:
    return {**run_meta("scripts/bench_planner.py"), "quick": args.quick, "seed": args.seed,
            "rule_sets": {"subsets": "per mesh shape with fsdp > 1: every subset of the large "
                          f"groups (>= {LARGE_GROUP:.0%} of parameter bytes) replicated over "
                          "fsdp, small groups following the largest; plus the pick; each "
                          "distinct program once, and a second copy of the pick as a control",
                          "sharded": "per mesh shape: every group over fsdp; plus the pick "
                          "and its control copy"}[settings.rule_sets],
            "held_fixed": "remat, microbatches and ZeRO level at the pick's; the planner's "
                          "microbatches capped at batch / 8 so every shape can run them",
            "timing": f"1 warm-up step; {settings.rounds} interleaved rounds x "
                      f"{settings.steps_per_round} steps, configs in random order, each "
                      f"visit after waiting up to {settings.quiet_wait_s:g} s for other "
                      f"processes to use < {QUIET_CORES} cores; more rounds for configs "
                      f"with < {settings.min_clean} clean steps (other processes < "
                      f"{QUIET_CORES} cores during the step) for up to "
                      f"{settings.timing_budget_s:g} s per case; then a race: the pick, its "
                      f"control and every config within {RACE_MARGIN:.0%} of the fastest "
                      f"get rounds up to {settings.race_samples} steps each, for up to "
                      f"{settings.race_budget_s:g} s per case. Measured = median of clean "
                      f"steps (of all steps, flagged 'contended', if too few); spread = "
                      f"IQR / median"}


def targets(result: dict) -> dict:
    """The issues' targets, checked on this run's figures (of the parts it ran)."""
    out: dict[str, Any] = {}
    if "sweep" in result:
        sweep = result["sweep"]
        out.update({"max_pick_over_best": max(c["ratio"] for c in sweep),
                    "pick_within_10pct_every_case": all(c["ratio"] <= 1.10 for c in sweep),
                    "min_spearman": min(c["spearman"] for c in sweep),
                    "spearman_at_least_0.8_every_case": all(c["spearman"] >= 0.8
                                                            for c in sweep)})
    if "planning" in result:
        on_1024 = [e for e in result["planning"] if e["devices"] == 1024]
        out["plan_175b_1024_process_s"] = on_1024[0]["total_process_s"] if on_1024 else None
        out["plan_175b_1024_under_10s"] = bool(on_1024) and on_1024[0]["total_process_s"] < 10
    return out


if __name__ == "__main__":
    main()
