"""Measure the local devices and describe them as a `Cluster` with calibrated figures.

Datasheets say nothing about the CPU mesh and flatter real hardware, so `calibrate()` times
matmuls, memory streaming and collectives on the devices it runs on, fits the collective
model the planners use (latency growing with the participants, plus bytes over bandwidth),
then times training steps of two probe GPTs under every mesh shape (jaxpar.cluster.probe) and scales
those figures to what a step sees (jaxpar.planners.fit). It caches the result, with the raw
timings and every fit, for fit-quality reports, as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy.optimize import nnls
from scipy.stats import spearmanr
from tqdm import tqdm

from jaxpar.cluster import probe
from jaxpar.cluster.devices import _host_memory_bytes, combined_kinds
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.fit import TERMS, fit_scales, scaled
from jaxpar.timing import alone

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
MESSAGE_BYTES = tuple(4096 * 8**i for i in range(5))  # 4 KiB ... 16 MiB per device
MATMUL_SIZES = (256, 512, 1024)
STREAM_BYTES = 64 * 2**20  # per device: far beyond any cache, as a model's parameters are
_STREAM_PASSES = 4  # read-modify-write passes over the buffer in one program
_REPEATS = 5  # timed calls per measurement, after one warm-up call
_LOOP_BYTES = 2**20  # messages under 1 MiB repeat in one program to amortise dispatch
_CACHE_FORMAT = 8  # bump when the record or how it is measured changes: old caches are redone


def ring_factor(kind: str, group: int) -> float:
    """Bytes each device sends per message byte with ring algorithms: 2(n-1)/n for
    all-reduce, (n-1)/n for all-gather, reduce-scatter and all-to-all."""
    share = (group - 1) / group
    return 2 * share if kind == "all_reduce" else share


def fit_alpha_beta(points: Sequence[dict]) -> dict[str, float]:
    """Non-negative least-squares fit of
    `seconds = latency + (group - 1) latency_per_device + ring_factor * bytes / bandwidth`
    over measured `points` ({kind, group, bytes, seconds}), weighted by 1/seconds so that
    small and large messages count alike (minimises relative error). The per-participant
    term is the rendezvous: a collective starts when its last device arrives."""
    t = np.array([p["seconds"] for p in points])
    x = np.array([[1.0, p["group"] - 1, ring_factor(p["kind"], p["group"]) * p["bytes"]]
                  for p in points])
    (alpha, per_device, beta), _ = nnls(x / t[:, None], np.ones_like(t))
    if alpha <= 0 or beta <= 0:
        raise RuntimeError(f"collective fit is not positive: latency={alpha}, 1/bandwidth={beta}")
    return {"latency": float(alpha), "latency_per_device": float(per_device),
            "bandwidth": float(1 / beta)}


def calibrate(devices: Sequence[jax.Device] | None = None, cache_dir: str | Path | None = None,
              refresh: bool = False, verbose: bool = True) -> Cluster:
    """A Cluster for `devices` (default: this process's devices, one node) with measured
    figures, read from the cache unless absent or `refresh`; measuring takes about 5
    minutes on 8 CPU devices, with a progress bar unless not `verbose`.

    Measured alone: the per-device fp32 matmul rate while *all* devices run a matmul at once
    (total rate / device count: the planner's steps keep every device busy, and simulated CPU
    devices share the host's cores, so the single-device rate, also recorded, would
    overstate them n-fold); collectives for every group size dividing the device count and
    4 KiB-16 MiB messages, fitted over all kinds to latency + latency per participant +
    bytes / bandwidth (the intra- and inter-node link figures: one machine, the same); the
    rate at which every device at once streams a 64 MiB buffer through an elementwise update;
    the host time to launch one jitted program (what the MPMD pipeline pays per op).
    Memory is the device's `bytes_limit`, else host RAM / devices.

    Inside a training step the same work costs otherwise (a profiled tensor-parallel step on
    the CPU mesh spent 4-5x the isolated time in each all-reduce, mostly waiting at its
    rendezvous for time-sliced devices). So the figures are then scaled to timed steps: two
    probe GPTs run under every mesh shape, and the four terms of each step's prediction
    (compute, collective latency, collective bytes, memory-bound parameter traffic) get
    the scales that predict the measured times best, none below `planners.fit.MIN_SCALES`
    (`record["step_fit"]`).
    The Cluster carries the scaled figures; the per-kind collective fits stay recorded only.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    path = _cache_path(devices, cache_dir)
    if path.exists() and not refresh:
        return Cluster(**json.loads(path.read_text())["cluster"])
    record = _measure(devices, verbose)
    record["fits"] = {kind: fit_alpha_beta([p for p in record["collectives"] if p["kind"] == kind])
                      for kind in KINDS}
    record["fits"]["all"] = fit_alpha_beta(record["collectives"])
    stats = devices[0].memory_stats() or {}
    link = record["fits"]["all"]
    isolated = Cluster(
        devices[0].device_kind, 1, len(devices),
        peak_flops=max(rate for _, rate in record["matmul"]["all_devices"]),
        memory_bytes=stats.get("bytes_limit") or _host_memory_bytes() / len(devices),
        intra_node_bandwidth=link["bandwidth"], intra_node_latency=link["latency"],
        inter_node_bandwidth=link["bandwidth"], inter_node_latency=link["latency"],
        memory_bandwidth=record["memory"]["all_devices"],
        latency_per_device=link["latency_per_device"], dispatch_latency=record["dispatch"],
        combined_kinds=combined_kinds(tuple(devices)), source="measured")
    record["step_fit"] = fit_steps(record["steps"], isolated)
    cluster = dataclasses.replace(scaled(isolated, record["step_fit"]["scales"]),
                                  source="calibrated")
    record["isolated_cluster"] = dataclasses.asdict(isolated)
    record["cluster"] = dataclasses.asdict(cluster)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return cluster


def fit_steps(steps: Sequence[dict], isolated: Cluster) -> dict:
    """The scales of the cost model's terms that predict the timed probe `steps` best, with
    each step's terms on the `isolated` cluster and the fit's quality on them."""
    terms = probe.terms_of(steps, isolated)
    seconds = np.array([s["seconds"] for s in steps])
    scales = fit_scales(terms, seconds)
    predicted = np.array([sum(scales[k] * t[k] for k in TERMS) for t in terms])
    by_probe = {name: float(spearmanr(predicted[mask], seconds[mask])[0])
                for name in probe.PROBES
                if (mask := np.array([s["probe"] == name for s in steps])).sum() > 2}
    return {"scales": scales, "terms": terms, "predicted_s": predicted.tolist(),
            "median_relative_error": float(np.median(np.abs(predicted / seconds - 1))),
            "spearman": by_probe}


def load_measurements(devices: Sequence[jax.Device] | None = None,
                      cache_dir: str | Path | None = None) -> dict:
    """The cached calibration record for `devices`: key, matmul rates, raw collective timings
    ({kind, group, bytes, seconds}), probe steps, fits, both clusters (isolated figures and
    step-fitted) and wall time. FileNotFoundError if none."""
    devices = list(jax.local_devices() if devices is None else devices)
    return json.loads(_cache_path(devices, cache_dir).read_text())


def measured_peak(devices: Sequence[jax.Device] | None = None,
                  cache_dir: str | Path | None = None) -> float | None:
    """The matmul FLOP/s per device with all of `devices` busy, from the cached calibration
    (the isolated figure, before the step fit); None if the devices were never calibrated."""
    try:
        record = load_measurements(devices, cache_dir)
    except FileNotFoundError:
        return None
    return float(record["isolated_cluster"]["peak_flops"])


def _cache_path(devices: Sequence[jax.Device], cache_dir: str | Path | None) -> Path:
    root = cache_dir or os.environ.get("JAXPAR_CACHE") or "~/.cache/jaxpar"
    kind = "".join(c if c.isalnum() else "_" for c in devices[0].device_kind)
    name = (f"calibration-v{_CACHE_FORMAT}-{devices[0].platform}-{kind}-{len(devices)}"
            f"-jax{jax.__version__}.json")
    return Path(root).expanduser() / name


def _measure(devices: Sequence[jax.Device], verbose: bool) -> dict:
    """Raw timings: matmul FLOP/s (one device alone, and per device with all busy) per
    size, memory bytes/s per device with all busy, the median seconds of each collective
    per group size and message size, and the probe GPTs' training steps (jaxpar.cluster.probe)."""
    start = time.perf_counter()
    n = len(devices)
    groups = [g for g in range(2, n + 1) if n % g == 0]
    plans = sum(len(probe.probe_plans(n, per_device * n))
                for _, per_device in probe.PROBES.values())
    bar = tqdm(total=2 * len(MATMUL_SIZES) + 1 + len(groups) * len(KINDS) * len(MESSAGE_BYTES)
               + plans, desc="calibrate", disable=not verbose)
    with alone():  # cooperating processes wait (jaxpar.timing)
        isolated = _measure_isolated(devices, groups, bar.update)
    steps = probe.time_steps(devices, bar.update)
    bar.close()
    key = {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
           "device_count": n, "jax_version": jax.__version__}
    return {"key": key, **isolated, "steps": steps, "seconds": time.perf_counter() - start}


def _measure_isolated(devices: Sequence[jax.Device], groups: Sequence[int],
                      advance: Callable[[], Any]) -> dict:
    """The isolated figures of `_measure`: matmul rates, the stream rate, the dispatch time
    and every collective of `groups` and MESSAGE_BYTES; `advance()` after each."""
    n = len(devices)
    matmul = jax.jit(jnp.matmul)
    everywhere = NamedSharding(Mesh(np.asarray(devices), ("d",)), P("d"))
    single, full = [], []
    for size in MATMUL_SIZES:
        flops = 2 * size**3
        a = jax.device_put(jnp.ones((size, size), jnp.float32), devices[0])
        single.append([size, flops / _median_seconds(matmul, a, a)])
        advance()
        b = jax.device_put(jnp.ones((n, size, size), jnp.float32), everywhere)
        full.append([size, flops / _median_seconds(matmul, b, b)])
        advance()
    memory = {"bytes": STREAM_BYTES, "all_devices": _stream_rate(everywhere, n)}
    dispatch = _dispatch_seconds(devices[0])
    advance()
    collectives = []
    for group in groups:
        mesh = Mesh(np.asarray(devices).reshape(n // group, group), ("rest", "group"))
        sharding = NamedSharding(mesh, P(("rest", "group")))
        for nbytes in MESSAGE_BYTES:
            x = jax.device_put(jnp.zeros((n * nbytes // 4,), jnp.float32), sharding)
            repeats = max(1, min(32, _LOOP_BYTES // nbytes))
            for kind in KINDS:
                program = _collective_program(kind, group, mesh, repeats)
                seconds = _median_seconds(program, x) / repeats
                collectives.append({"kind": kind, "group": group, "bytes": nbytes,
                                    "seconds": seconds})
                advance()
    return {"matmul": {"single": single, "all_devices": full}, "memory": memory,
            "dispatch": dispatch, "collectives": collectives}


def _stream_rate(everywhere: NamedSharding, n: int) -> float:
    """Bytes/s one device reads and writes while all `n` stream their own STREAM_BYTES
    buffer through an elementwise update, in place, `_STREAM_PASSES` times in one program:
    the memory-bound work of an optimizer step, on every device at once."""
    x = jax.device_put(jnp.zeros((n * STREAM_BYTES // 4,), jnp.float32), everywhere)
    update = jax.jit(lambda v: lax.fori_loop(0, _STREAM_PASSES, lambda _, v: v * 0.5 + 1.0, v))
    return 2 * _STREAM_PASSES * STREAM_BYTES / _median_seconds(update, x)


def _collective_program(kind: str, group: int, mesh: Mesh, repeats: int) -> Callable:
    """A jitted program running `kind` over the mesh's `group` axis `repeats` times in a
    loop (amortising dispatch, as collectives inside a training step are), each device
    holding a message of its whole shard."""
    def step(v: jax.Array) -> jax.Array:
        part = v.shape[0] // group
        if kind == "all_reduce":
            return lax.psum(v, "group")
        if kind == "all_gather":
            return lax.all_gather(v[:part], "group", tiled=True)
        if kind == "reduce_scatter":
            return v.at[:part].set(lax.psum_scatter(v, "group", tiled=True))
        return lax.all_to_all(v, "group", 0, 0, tiled=True)

    spec = P(("rest", "group"))
    body = jax.shard_map(lambda v: lax.fori_loop(0, repeats, lambda _, v: step(v), v),
                         mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    return jax.jit(body)


def _dispatch_seconds(device: jax.Device, calls: int = 200) -> float:
    """Host seconds per launch of a jitted program that does next to nothing: the median
    over repeats of `calls` chained launches, each returning before its result is ready."""
    step = jax.jit(lambda x: x + 1)
    x = jax.block_until_ready(step(jax.device_put(jnp.zeros((8,), jnp.float32), device)))
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            x = step(x)
        times.append((time.perf_counter() - start) / calls)
        jax.block_until_ready(x)
    return float(np.median(times))


def _median_seconds(fn: Callable, *args: jax.Array) -> float:
    jax.block_until_ready(fn(*args))  # warm-up: compiles
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))
