# ruff: noqa: E402  (XLA reads the device-count flag when jax is first imported)
"""Benchmark of jaxpar's training step against its peers on 8 simulated CPU devices: the
program a user writes by hand (scripts/handwritten.py) and MaxText 0.2.5's own GPT-3 train
step (scripts/maxtext_step.py, in its own Python 3.12 virtualenv).

For two GPT sizes and every named plan (MaxText: dp8, fsdp8, dp2+tp4, fsdp2+tp4), each
program is traced and lowered after `jax.clear_caches()` (median of a few), compiled, read
for per-device memory, checked to give jaxpar's losses (the hand-written one: same model,
same initial state), then timed in interleaved rounds in a shuffled order (MaxText steps in
its own process, driven one visit at a time through `maxtext_step.py --serve`). Step time is
the median of all timed steps; MFU is the planner's FLOP count of the step (the training
script's) over the step time and 8 x the calibrated matmul rate.

    python scripts/bench_peers.py                   # jax 0.10: docs/bench_peers_jax0.10.json
    .venv-jax012/bin/python scripts/bench_peers.py  # jax 0.12: docs/bench_peers_jax0.12.json
    python scripts/bench_peers.py --quick --out /tmp/peers.json   # smoke run (tests)

MaxText runs only where its virtualenv exists (`bash scripts/maxtext_setup.sh`, or
`--maxtext-python PATH`) and has this run's jax version; otherwise its rows say why not.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from handwritten import handwritten

import jaxpar
from jaxpar import host_memory
from jaxpar.cluster.probe import example_batch
from jaxpar.hlo import KINDS, collective_bytes_per_step, count
from jaxpar.models.gpt import build, lm_loss
from jaxpar.models.presets import GPTConfig, preset
from jaxpar.named import named_plan
from jaxpar.planners.pipeline.result import step_flops
from jaxpar.planners.sharding.search import merging_grad_reduce
from jaxpar.report import markdown_table, run_meta, text_table, write_result
from jaxpar.runtime.train import peak_flops
from jaxpar.timing import Timed, interleave
from jaxpar.tracing.graph import trace_graph

ROOT = Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
NAMED = ("dp8", "fsdp8", "tp8", "dp2+tp4", "dp4+fsdp2", "fsdp2+tp4", "dp2+fsdp2+tp2")
MAXTEXT_PLANS = ("dp8", "fsdp8", "dp2+tp4", "fsdp2+tp4")
MAXTEXT_PYTHON = ROOT / ".venv-maxtext" / "bin" / "python"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cfg: GPTConfig
    batch: int


@dataclasses.dataclass(frozen=True)
class Settings:
    cases: tuple[Case, ...]
    plans: tuple[str, ...]
    rounds: int
    steps_per_round: int
    lowerings: int  # traced and lowered this many times, after clearing JAX's caches


FULL = Settings((Case("small", preset("small"), 16),
                 Case("e384-l3", GPTConfig(vocab=1024, length=64, embed=384, heads=8,
                                           layers=3), 16)), NAMED, 10, 2, 3)
QUICK = Settings((Case("tiny", preset("tiny"), 8),), ("dp8", "fsdp8"), 2, 1, 1)


class MaxText:
    """MaxText's step in its own process (`maxtext_step.py --serve`), timed by itself."""

    def __init__(self, python: Path, plan: str, cfg: GPTConfig, batch: int, hlo: Path):
        sizes = {"embed": cfg.embed, "layers": cfg.layers, "heads": cfg.heads,
                 "head-dim": cfg.head_dim, "mlp": cfg.mlp, "vocab": cfg.vocab,
                 "length": cfg.length, "batch": batch}
        argv = [str(python), str(ROOT / "scripts" / "maxtext_step.py"), "--plan", plan,
                "--steps", "0", "--serve", f"--hlo-out={hlo}",
                *(f"--{k}={v}" for k, v in sizes.items())]
        env = {**{k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")},
               **host_memory.ENVIRONMENT}  # the malloc settings jaxpar's process runs under
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.name, self.samples = "maxtext", []
        self.header = self._read()
        self.header["hlo"] = hlo_summary(hlo.read_text())

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"maxtext_step.py ended (exit {self.proc.wait()}); see its stderr")

    def step(self) -> tuple[float, float]:
        self.proc.stdin.write("step 1\n")
        self.proc.stdin.flush()
        return self._read()["step_s"][0], 0.0  # its own clock; contention not read

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def maxtext_python(path: Path) -> tuple[Path | None, str]:
    """The MaxText interpreter, or None and why it is skipped."""
    if not path.exists():
        return None, (f"{path} not found: set it up with `bash scripts/maxtext_setup.sh` "
                      "(or pass --maxtext-python)")
    theirs = subprocess.run([str(path), "-c", "import jax; print(jax.__version__)"],
                            capture_output=True, text=True).stdout.strip()
    if theirs != jax.__version__:
        return None, f"MaxText's venv has jax {theirs or '?'}, this run jax {jax.__version__}"
    return path, ""


def hlo_summary(text: str) -> dict:
    """What the compiled step runs: collectives per kind (ops, and bytes per step with the
    layer loop's trips), the fusions (kernels) and the copies and transposes left outside
    them."""
    ops = [line.split(" = ", 1)[1] for line in text.splitlines() if " = " in line]
    return {"collectives": count(text), "collective_bytes": collective_bytes_per_step(text, 64),
            **{name: sum(f" {op}(" in o for o in ops)
               for name, op in (("fusions", "fusion"), ("copies", "copy"),
                                ("transposes", "transpose"))}}


def lowering(fn: Any, state: Any, batch: Any, repeats: int) -> dict:
    """Median seconds to trace + lower the step (caches cleared each time), then to compile
    it, and the compiled program's per-device memory and HLO summary."""
    lower_s = []
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        lowered = fn.trace(state, batch).lower()
        lower_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    return {"lower_s": statistics.median(lower_s), "compile_s": compile_s,
            "memory": {k: getattr(stats, f"{k}_size_in_bytes")
                       for k in ("argument", "output", "alias", "temp")},
            "hlo": hlo_summary(compiled.as_text())}


def run_case(case: Case, spec: str, settings: Settings, python: Path | None, why: str,
             flops: float, peak: float | None, seed: int) -> dict:
    host = example_batch(case.cfg, case.batch, seed)
    optimizer = optax.adamw(1e-3)
    named = named_plan(spec, NUM_DEVICES)
    plan = dataclasses.replace(named, grad_reduce=merging_grad_reduce(
        named, jaxpar.local_cluster()))
    par = jaxpar.parallelize(build(case.cfg), optimizer, lm_loss, plan, host)
    init, step, shard = handwritten(build(case.cfg), optimizer, lm_loss, par.plan, host)
    runs = [Timed("jaxpar", par.step, par.init(jax.random.key(seed)), par.shard_batch(host)),
            Timed("hand-written", step, init(jax.random.key(seed)), shard(host))]
    out: dict[str, Any] = {"plan": spec, "grad_reduce": plan.grad_reduce, "peers": {}}
    for run in runs:  # each clears JAX's caches: all before the first step
        out["peers"][run.name] = {**lowering(run.fn, run.state, run.batch, settings.lowerings),
                                  "losses": []}
    for run in runs:
        for _ in range(2):  # two steps from the same state, which also warm up
            run.state, metrics = run.fn(run.state, run.batch)
            out["peers"][run.name]["losses"].append(float(metrics["loss"]))
    if spec in MAXTEXT_PLANS and python is not None:
        with tempfile.TemporaryDirectory() as tmp:
            peer = MaxText(python, spec, case.cfg, case.batch, Path(tmp) / "step.hlo")
        runs.append(peer)
        out["peers"]["maxtext"] = {k: peer.header[k] for k in (
            "lower_s", "compile_s", "memory", "hlo", "losses", "num_params", "remat_policy",
            "maxtext_version", "jax_version")}
        for _ in range(2):
            peer.step()  # warm-up, as the others had
        peer.samples.clear()
    elif spec in MAXTEXT_PLANS:
        out["peers"]["maxtext"] = {"skipped": why}
    try:
        interleave(runs, settings.rounds, settings.steps_per_round, seed)
    finally:
        for run in runs[2:]:
            run.close()
    for run in runs:
        median = float(np.median([t for t, _ in run.samples]))
        out["peers"][run.name].update(
            median_s=median, steps=len(run.samples),
            mfu=flops / (median * NUM_DEVICES * peak) if peak else None)
    ours = out["peers"]["jaxpar"]
    for name, theirs in out["peers"].items():
        if name != "jaxpar" and "median_s" in theirs:
            out[f"over_{name}"] = ours["median_s"] / theirs["median_s"]
            out[f"lower_over_{name}"] = ours["lower_s"] / theirs["lower_s"]
    hand = out["peers"]["hand-written"]["losses"]
    out["loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], hand))
    return out


def print_case(case: dict, table: Callable = text_table) -> None:
    def cell(r: dict, name: str, key: str, fmt: str) -> str:
        p = r["peers"].get(name, {})
        return "skipped" if "skipped" in p else format(p[key], fmt) if p.get(key) else "-"

    rows = [[r["plan"], cell(r, "jaxpar", "median_s", ".4f"),
             cell(r, "hand-written", "median_s", ".4f"), cell(r, "maxtext", "median_s", ".4f"),
             f"{r['over_hand-written']:.3f}",
             f"{r['over_maxtext']:.3f}" if "over_maxtext" in r else "-",
             f"{r['lower_over_hand-written']:.2f}", cell(r, "jaxpar", "mfu", ".1%"),
             cell(r, "maxtext", "mfu", ".1%"),
             f"{r['peers']['jaxpar']['memory']['temp'] / 2**20:.1f}"] for r in case["plans"]]
    print(table(["plan", "jaxpar s", "hand s", "maxtext s", "/hand", "/maxtext",
                      "lower /hand", "MFU", "MaxText MFU", "temp MiB"], rows))
    hlo = [[r["plan"], name, "/".join(str(p["hlo"]["collectives"][k]) for k in KINDS[:3]),
            f"{sum(p['hlo']['collective_bytes'].values()) / 2**20:.1f}", p["hlo"]["fusions"],
            p["hlo"]["copies"], p["hlo"]["transposes"], f"{p['memory']['temp'] / 2**20:.1f}"]
           for r in case["plans"] for name, p in r["peers"].items() if "hlo" in p]
    print()
    print(table(["plan", "program", "AR/AG/RS ops", "collective MiB/step", "fusions",
                      "copies", "transposes", "temp MiB"], hlo))


def main(argv: list[str] | None = None) -> dict:
    version = ".".join(jax.__version__.split(".")[:2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run for the tests")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "docs" / f"bench_peers_jax{version}.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", action="append", default=[], choices=NAMED,
                        help="run only this plan (repeatable; default: every named plan)")
    parser.add_argument("--case", action="append", default=[],
                        choices=[c.name for c in FULL.cases],
                        help="run only this model size (repeatable; default: both)")
    parser.add_argument("--maxtext-python", type=Path, default=MAXTEXT_PYTHON,
                        help=f"MaxText's interpreter (default: {MAXTEXT_PYTHON.relative_to(ROOT)})")
    parser.add_argument("--tables", type=Path, metavar="JSON",
                        help="only print a stored result's tables in Markdown (for the docs)")
    args = parser.parse_args(argv)
    if args.tables:
        stored = json.loads(args.tables.read_text())
        for case in stored["cases"]:
            print(f"\n{case['case']}, batch {case['batch']}:\n")
            print_case(case, markdown_table)
        return stored
    settings = QUICK if args.quick else FULL
    if args.plan:
        settings = dataclasses.replace(settings, plans=tuple(args.plan))
    if args.case:
        settings = dataclasses.replace(
            settings, cases=tuple(c for c in settings.cases if c.name in args.case))
    if jax.device_count() != NUM_DEVICES:
        raise SystemExit(f"need {NUM_DEVICES} devices, found {jax.device_count()}; "
                         f"set XLA_FLAGS={_FLAG}={NUM_DEVICES}")
    python, why = maxtext_python(args.maxtext_python)
    if why:
        print(f"MaxText skipped: {why}", file=sys.stderr)
    peak, peak_source = peak_flops(jax.devices())
    started = time.perf_counter()
    result: dict[str, Any] = {"meta": {
        **run_meta("scripts/bench_peers.py"), "quick": args.quick, "seed": args.seed,
        "maxtext": why or "run", "peak_flops_per_device": peak, "peak_source": peak_source,
        "host_memory": {"jaxpar_process": host_memory.keep_freed_memory(),
                        "maxtext_environment": host_memory.ENVIRONMENT},
        "timing": f"2 untimed steps each, then {settings.rounds} interleaved rounds x "
                  f"{settings.steps_per_round} steps in a shuffled order; median of all steps",
        "lowering": f"median of {settings.lowerings} x (jax.clear_caches(); "
                    "step.trace(state, batch).lower())"}, "cases": []}
    for case in settings.cases:
        graph = trace_graph(build(case.cfg), lm_loss, example_batch(case.cfg, case.batch, 0))
        flops = step_flops(graph, "none")[0]
        entry = {"case": case.name, "config": dataclasses.asdict(case.cfg),
                 "batch": case.batch, "model_flops_per_step": flops, "plans": []}
        print(f"== {case.name}: {case.cfg}, batch {case.batch}", flush=True)
        for spec in settings.plans:
            print(f"  {spec}", file=sys.stderr, flush=True)
            entry["plans"].append(run_case(case, spec, settings, python, why, flops, peak,
                                           args.seed))
        print_case(entry)
        result["cases"].append(entry)
    rows = [r for c in result["cases"] for r in c["plans"]]
    result["targets"] = {
        "max_over_handwritten": max(r["over_hand-written"] for r in rows),
        "max_over_maxtext": max((r["over_maxtext"] for r in rows if "over_maxtext" in r),
                                default=None),
        "max_lower_over_handwritten": max(r["lower_over_hand-written"] for r in rows),
        "same_losses_as_handwritten": all(r["loss_max_rel_diff"] < 1e-5 for r in rows)}
    write_result(result, args.out, time.perf_counter() - started)
    return result


if __name__ == "__main__":
    main()
