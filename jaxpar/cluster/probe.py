"""Training steps of two small probe GPTs, timed under every data x fsdp x tensor mesh shape:
what `calibrate()` fits the cost model's in-step scales to (jaxpar.planners.fit).

The probes are chosen to disagree: the narrow one (embed 192, sequence 96) runs fastest
with little or no tensor parallelism, since that cuts its matmuls thin and all-reduces its
activations; the wide one (embed 384, sequence 48) runs fastest tensor-parallel, since its
parameters outweigh its activations. A fit over both cannot price either kind of traffic
at nothing. Neither is a model the planner benchmark sweeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpar.emit.parallelized import Parallelized
from jaxpar.emit.step import parallelize_flat
from jaxpar.models.gpt import build, lm_loss
from jaxpar.models.presets import GPTConfig
from jaxpar.plan import Plan, PlanError
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.fit import step_terms
from jaxpar.planners.graph import ModelGraph
from jaxpar.planners.sharding.search import describe, mesh_shapes
from jaxpar.timing import Timed, alone, no_collector, wait_quiet
from jaxpar.tracing.graph import trace_graph

# config, and sequences per device: a batch of 16 and 8 on 8 devices
PROBES = {"narrow": (GPTConfig(vocab=768, length=96, embed=192, heads=8, layers=3), 2),
          "wide": (GPTConfig(vocab=1536, length=48, embed=384, heads=8, layers=2), 1)}
SAMPLES = 5  # timed steps per plan with quiet cores (jaxpar.timing), after one warm-up step
MAX_SAMPLES = 3 * SAMPLES  # steps taken at most while other processes keep the cores busy
QUIET_WAIT = 2.0  # seconds to wait for quiet cores before a plan's steps


def probe_plans(num_devices: int, batch: int) -> list[Plan]:
    """Every data x fsdp x tensor mesh of `num_devices` with default rules, and with two
    microbatches where it has a tensor axis (twice the all-reduces, each half the bytes:
    what tells a collective's latency from its transfer), each if the batch divides."""
    plans = []
    for mesh in mesh_shapes(num_devices):
        for microbatches in (1, 2) if dict(mesh).get("tensor", 1) > 1 else (1,):
            plan = Plan(mesh=mesh, microbatches=microbatches)
            try:
                plan.check_batch(batch)
            except PlanError:
                continue
            plans.append(dataclasses.replace(plan, name=describe(plan)))
    return plans


def time_steps(devices: Sequence[jax.Device], advance: Callable[[], Any]) -> list[dict]:
    """{probe, batch, mesh, microbatches, plan, seconds (median), samples, clean (how many
    samples ran on quiet cores)} for every probe
    and plan; `advance()` is called after each plan (a progress bar). A probe's programs
    compile two at a time (XLA releases the GIL while it compiles); steps run one by one,
    each plan's after waiting for quiet cores, until SAMPLES of them ran while other
    processes left the cores quiet (`jaxpar.timing`; at most MAX_SAMPLES steps), holding
    the timing lock (`jaxpar.timing.alone`) while a probe's steps run."""
    steps = []
    for name, (cfg, per_device) in PROBES.items():
        batch = per_device * len(devices)
        host_batch = example_batch(cfg, batch)
        runs = []
        for plan in probe_plans(len(devices), batch):
            try:
                par = parallelize_flat(build(cfg), optax.adamw(1e-3), lm_loss, plan,
                                       host_batch, devices)
            except PlanError:  # a tensor axis the model's dimensions do not divide
                advance()
                continue
            data = par.shard_batch(host_batch)
            runs.append((plan, par, data, par.lower(data)))
        with ThreadPoolExecutor(2) as pool:
            compiled = list(pool.map(lambda run: run[3].compile(), runs))
        with alone():
            for (plan, par, data, _), step in zip(runs, compiled):
                clock = Timed(plan.name, step, random_state(par), data).warm_up()
                wait_quiet(QUIET_WAIT)
                with no_collector():
                    while len(clock.clean) < SAMPLES and len(clock.samples) < MAX_SAMPLES:
                        clock.samples.append(clock.step())
                steps.append({"probe": name, "batch": batch,
                              "mesh": [list(axis) for axis in plan.mesh],
                              "microbatches": plan.microbatches, "plan": plan.name,
                              "seconds": clock.median(), "samples": clock.times,
                              "clean": len(clock.clean)})
                advance()
    return steps


def terms_of(steps: Sequence[dict], cluster: Cluster) -> list[dict[str, float]]:
    """The cost model's terms (planners.fit.TERMS) of each timed step on `cluster`."""
    graphs: dict[str, ModelGraph] = {}
    terms = []
    for s in steps:
        cfg, _ = PROBES[s["probe"]]
        if s["probe"] not in graphs:
            graphs[s["probe"]] = trace_graph(build(cfg), lm_loss, example_batch(cfg, s["batch"]))
        graph = graphs[s["probe"]]
        plan = Plan(mesh=tuple((axis, size) for axis, size in s["mesh"]),
                    microbatches=s["microbatches"]).bind(graph.params)
        terms.append(step_terms(graph, plan, cluster))
    return terms


def example_batch(cfg: GPTConfig, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random next-token inputs and targets, (batch, cfg.length) int32."""
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab, (batch, cfg.length + 1))
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}


def random_state(par: Parallelized, seed: int = 0) -> Any:
    """A train state placed in the plan's layout from host arrays: |N(0, 0.02)| floats
    (non-negative, as Adam's second moment must be), zero integers. Step time does not
    depend on the values, and `par.init` would cost one more compile per plan."""
    rng = np.random.default_rng(seed)

    def leaf(spec: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(spec.dtype, jnp.floating):
            value = np.abs(rng.normal(0.0, 0.02, spec.shape)).astype(spec.dtype)
        else:
            value = np.zeros(spec.shape, spec.dtype)
        return jax.device_put(value, spec.sharding)

    return jax.tree.map(leaf, par.abstract_state)
