"""Train a GPT preset on the Python standard library's bytes under a named plan.

`python -m jaxpar.runtime.train --plan dp2+tp4` runs on 8 simulated CPU devices by default and
prints the plan, a progress bar with loss, tokens/s, model FLOP/s and MFU (the planner's
FLOP count of the step against the devices' peak), and the loss drop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from jaxpar.models.presets import PRESETS
from jaxpar.named import named_plan
from jaxpar.plan import GRAD_REDUCE, REMAT, PlanError

# ----------------------------------------------------------------------------- flags


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jaxpar.runtime.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="GPT preset")
    p.add_argument("--plan", default="dp2+fsdp2+tp2", help="named plan, e.g. dp, fsdp, dp2+tp4")
    p.add_argument("--steps", type=int, default=300, help="train up to this step")
    p.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the learning-rate schedule (default: --steps)")
    p.add_argument("--batch", type=int, default=32, help="global batch size (sequences)")
    p.add_argument("--length", type=int, default=64, help="sequence length (tokens)")
    p.add_argument("--lr", type=float, default=6e-3, help="peak learning rate")
    p.add_argument("--microbatches", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--remat", nargs="?", const="full", default="none", choices=REMAT,
                   help="what each block saves for the backward pass: none (everything), "
                        "dots (matmul outputs; the rest is recomputed) or full (its input: "
                        "the block is recomputed); --remat alone means full")
    p.add_argument("--grad-reduce", default=GRAD_REDUCE[0], choices=GRAD_REDUCE,
                   help="how fsdp-sharded gradients are reduced: reduce-scatter (per "
                        "parameter) or all-reduce (whole, then sliced: one collective per "
                        "block where the compiler merges all-reduces only, as on CPU)")
    p.add_argument("--devices", type=int, default=8,
                   help="devices to use; on CPU this many are simulated")
    p.add_argument("--checkpoint-dir", default=None, help="resume from and save checkpoints here")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval (steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and the data order")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.save_every < 1:
        p.error(f"--save-every {args.save_every}: save at least every step (>= 1)")
    return args


def simulate_cpu_devices(count: int) -> None:
    """Ask XLA for `count` host devices; must run before jax is imported (CPU only)."""
    flag = "--xla_force_host_platform_device_count"
    flags = os.environ.get("XLA_FLAGS", "")
    if flag not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}={count}".strip()


def _rate(flops_per_s: float) -> str:
    unit, scale = ("TFLOP/s", 1e12) if flops_per_s >= 1e12 else ("GFLOP/s", 1e9)
    return f"{flops_per_s / scale:.2f} {unit}"


def peak_flops(devices) -> tuple[float | None, str]:
    """Per-device peak FLOP/s for MFU and where it comes from: an accelerator's datasheet;
    on anything else (the CPU) the matmul rate `jaxpar.calibrate()` measured, if it ran."""
    from jaxpar.cluster.calibration import measured_peak
    from jaxpar.cluster.devices import local_cluster

    cluster = local_cluster(devices)
    if cluster.source == "datasheet":
        return cluster.peak_flops, f"{cluster.name} datasheet"
    measured = measured_peak(devices)
    return measured, "calibrated matmul rate" if measured else "not calibrated"


# ----------------------------------------------------------------------------- training


def train(args: argparse.Namespace) -> dict:
    """Run the training loop described by `args`; returns the results as a dict."""
    plan = named_plan(args.plan, args.devices, microbatches=args.microbatches, remat=args.remat,
                      grad_reduce=args.grad_reduce)
    plan.check_batch(args.batch)
    simulate_cpu_devices(args.devices)

    import jax
    import optax
    from tqdm import tqdm

    from jaxpar.api import parallelize
    from jaxpar.models import gpt
    from jaxpar.planners.pipeline.result import step_flops
    from jaxpar.runtime.data import ByteCorpus
    from jaxpar.tracing.graph import trace_graph

    devices = jax.devices()
    if len(devices) < args.devices:
        raise PlanError(f"--devices {args.devices} asked for, but jax sees {len(devices)} "
                        f"{devices[0].platform} devices; pass --devices {len(devices)}")

    # ---- model, optimizer, data
    cfg = PRESETS[args.model]
    total = args.schedule_steps or args.steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=max(1, total // 10), decay_steps=total, end_value=args.lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b2=0.99, weight_decay=0.1))
    corpus = ByteCorpus(seed=args.seed)
    example = corpus.batch(0, args.batch, args.length)
    model_fn = gpt.build(cfg, length=max(cfg.length, args.length))
    par = parallelize(model_fn, optimizer, gpt.lm_loss, plan, example, devices[: args.devices])
    print(par.plan)

    # ---- state: resume from the latest checkpoint, or initialise
    ckpt = par.checkpointer(args.checkpoint_dir, args.save_every) if args.checkpoint_dir else None
    state = ckpt.restore() if ckpt else None
    if state is None:
        state = par.init(jax.random.key(args.seed))
    start = par.steps_done(state)
    if start:
        print(f"resumed from step {start} in {args.checkpoint_dir}")

    # ---- FLOPs: the planner's count of the traced step (3 x forward), and the devices' peak
    graph = trace_graph(model_fn, gpt.lm_loss, example)
    tokens_per_step, flops_per_step = args.batch * args.length, step_flops(graph, "none")[0]
    peak, peak_source = peak_flops(devices[: args.devices])
    total_peak = peak * args.devices if peak else None

    # ---- loop: the first step compiles, so rates count only the steps after it
    losses, t0, tokens_per_s = [], 0.0, 0.0
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train")
    for step in bar:
        batch = par.shard_batch(corpus.batch(step, args.batch, args.length))
        state, metrics = par.step(state, batch)
        jax.block_until_ready(state)
        losses.append(float(metrics["loss"]))
        if len(losses) == 1:
            t0 = time.perf_counter()
        else:
            tokens_per_s = tokens_per_step * (len(losses) - 1) / (time.perf_counter() - t0)
            flops_per_s = flops_per_step * tokens_per_s / tokens_per_step
            mfu = f"{flops_per_s / total_peak:.1%}" if total_peak else "n/a"
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                            model=_rate(flops_per_s), mfu=mfu)
        if ckpt:
            ckpt.save(step + 1, state, force=step + 1 == args.steps)
    bar.close()
    if ckpt:
        ckpt.close()

    # ---- report: end loss is the mean of the last 10 steps (fewer if the run is shorter)
    flops_per_s = flops_per_step * tokens_per_s / tokens_per_step
    results = {"plan": plan.name, "model": args.model, "start_step": start, "steps": args.steps,
               "tokens_per_s": tokens_per_s, "model_flops_per_step": flops_per_step,
               "model_flops_per_s": flops_per_s,
               "peak_flops_per_device": peak, "peak_source": peak_source,
               "mfu": flops_per_s / total_peak if total_peak and tokens_per_s else None}
    if results["mfu"] is not None:
        print(f"MFU {results['mfu']:.1%}: {_rate(flops_per_s)} of {args.devices} x "
              f"{_rate(peak)} ({peak_source})")
    elif tokens_per_s:
        print(f"MFU not known: no peak FLOP/s for {devices[0].device_kind} devices "
              "(run jaxpar.calibrate() once to measure it)")
    if losses:
        results |= {"start_loss": losses[0], "end_loss": sum(losses[-10:]) / len(losses[-10:]),
                    "final_loss": losses[-1]}
        print(f"loss: start {losses[0]:.4f} -> end {results['end_loss']:.4f} "
              f"over {len(losses)} steps")
    else:
        print(f"nothing to train: the checkpoint is at step {start}, --steps is {args.steps}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 2 with a one-line message on a bad plan."""
    args = parse_args(argv)
    try:
        train(args)
    except PlanError as e:
        print(f"jaxpar.runtime.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
