# ruff: noqa: E402  (XLA reads the device-count flag when jax is first imported)
"""Every pipeline schedule in both forms against the single-device run (issue 4's first bar).

The grid: form (mpmd, spmd) x schedule (gpipe, 1f1b, interleaved_1f1b with v = 2,
zero_bubble_h1) x p in {2, 4, 8} x m in {4, 8} x the stage's other devices as dp or tp
(none left at p = 8), where the schedule allows m (interleaving: m a multiple of p; ZB-H1:
m >= p). Each case compiles its runtime, computes the loss and gradient of one batch at the
same random parameters and compares them with `jax.value_and_grad` of the unpipelined loss
on one device (rtol 1e-4, atol 1e-7, fp32). tests/test_spmd.py and tests/test_mpmd.py run a
sample of this grid on every CI run; this script runs all of it:

    python scripts/check_pipeline_grid.py             # about 10 minutes on 2 cores
    python scripts/check_pipeline_grid.py --quick --out /tmp/grid.json   # two cases
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse
import datetime
import itertools
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import jaxpar
from jaxpar.models import gpt
from jaxpar.plan import Pipeline
from jaxpar.planners.schedules.generators import schedule_allows
from jaxpar.report import text_table, write_result
from jaxpar.tracing.params import abstract_params

ROOT = Path(__file__).resolve().parents[1]
NUM_DEVICES, RTOL, ATOL = 8, 1e-4, 1e-7
VOCAB, LENGTH, BATCH = 32, 8, 32
MODEL = gpt.build("tiny", layers=16, embed=32, heads=4, mlp=64, length=LENGTH, vocab=VOCAB)
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble_h1", 1))


def grid(quick: bool) -> list[tuple[str, str, int, int, int, str]]:
    """(form, schedule, v, p, m, plan spec) of every case."""
    cases = []
    for form, (schedule, v), p, m in itertools.product(("mpmd", "spmd"), SCHEDULES, (2, 4, 8),
                                                       (4, 8)):
        if not schedule_allows(schedule, p, m, v):
            continue
        inner = NUM_DEVICES // p
        for spec in (f"pp{p}+dp{inner}", f"pp{p}+tp{inner}") if inner > 1 else (f"pp{p}",):
            cases.append((form, schedule, v, p, m, spec))
    if quick:
        return [c for c in cases if c[1:] == ("zero_bubble_h1", 1, 2, 4, "pp2+tp4")]
    return cases


def reference() -> tuple[dict, dict, tuple[float, dict]]:
    """Random parameters, a batch, and the single-device loss and gradient there."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (BATCH, LENGTH + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    graphdef, shapes, _ = abstract_params(MODEL)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)
    with jax.default_device(jax.devices()[0]):
        loss, grads = jax.jit(jax.value_and_grad(
            lambda p: gpt.lm_loss(nnx.merge(graphdef, p), batch)))(params)
    return params, batch, (float(loss), jax.tree.map(np.asarray, grads))


def excess(got: Any, want: Any) -> float:
    """The largest |got - want| / (atol + rtol |want|) over entries: at most 1 passes."""
    return max(float(np.max(np.abs(np.asarray(g) - w) / (ATOL + RTOL * np.abs(w))))
               for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def run_case(case: tuple, params: dict, batch: dict, want: tuple[float, dict]) -> dict:
    form, schedule, v, p, m, spec = case
    start = time.perf_counter()
    plan = jaxpar.named_plan(spec, NUM_DEVICES, microbatches=m,  # SPMD keeps matmul outputs
                             remat="dots" if form == "spmd" else "none",
                             pipeline=Pipeline(schedule, virtual=v, form=form))
    par = jaxpar.parallelize(MODEL, optax.sgd(0.1), gpt.lm_stages, plan, batch)
    loss, grads = par.loss_and_grads(params, batch)
    loss_excess, grad_excess = excess(loss, want[0]), excess(grads, want[1])
    return {"form": form, "schedule": schedule, "v": v, "p": p, "m": m, "plan": spec,
            "loss_excess": loss_excess, "grad_excess": grad_excess,
            "equal": loss_excess <= 1 and grad_excess <= 1,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two cases, for the smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "pipeline_grid.json")
    args = parser.parse_args(argv)
    if jax.device_count() != NUM_DEVICES:
        raise SystemExit(f"need {NUM_DEVICES} devices, found {jax.device_count()}; "
                         f"set XLA_FLAGS={_FLAG}={NUM_DEVICES}")
    started = time.perf_counter()
    params, batch, want = reference()
    cases = grid(args.quick)
    rows = [run_case(case, params, batch, want) for case in tqdm(cases, desc="pipeline grid")]
    result = {"meta": {
        "command": " ".join(["python scripts/check_pipeline_grid.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__, "python": platform.python_version(), "quick": args.quick,
        "model": "gpt tiny: 16 layers, embed 32, 4 heads, mlp 64, length 8, vocab 32",
        "batch": BATCH, "tolerance": {"rtol": RTOL, "atol": ATOL},
        "excess": "max |got - want| / (atol + rtol |want|) over entries; <= 1 passes"},
        "cases": rows}
    print(text_table(["form", "schedule", "v", "p", "m", "plan", "loss excess", "grad excess",
                      "equal", "s"],
                     [[r["form"], r["schedule"], r["v"], r["p"], r["m"], r["plan"],
                       r["loss_excess"], r["grad_excess"], r["equal"], r["seconds"]]
                      for r in rows]))
    result["targets"] = {"cases": len(rows), "all_equal": all(r["equal"] for r in rows),
                         "max_loss_excess": max(r["loss_excess"] for r in rows),
                         "max_grad_excess": max(r["grad_excess"] for r in rows)}
    write_result(result, args.out, time.perf_counter() - started)
    return result


if __name__ == "__main__":
    main()
