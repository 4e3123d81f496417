"""Megatron-LM's GPT configurations (Narayanan et al., SC'21, Table 1) as planner inputs.

An analytic mixed-precision GPT graph shaped as the tracer reports one, the paper's table,
and the paper's own (t, p, d) priced by the same cost model the planners use, so the
planners' picks and the paper's choices are compared like for like.
"""

from __future__ import annotations

import csv
from pathlib import Path

from jaxpar.named import named_plan
from jaxpar.plan import ParamInfo, PlanError
from jaxpar.planners.cluster import Cluster
from jaxpar.planners.cost import Options, predict
from jaxpar.planners.graph import Group, Matmul, ModelGraph, Tensor
from jaxpar.planners.pipeline.search import evaluate_pipeline
from jaxpar.planners.schedules.generators import schedule_allows
from jaxpar.planners.units import format_bytes

# Mixed precision as Megatron-LM trains: fp16 parameters, gradients and activations (2 bytes);
# an fp32 master copy and Adam's two fp32 moments are 12 bytes per parameter = 6 fp16 slots.
MIXED = Options(optimizer_slots=6)


def gpt_graph(hidden, heads, layers, batch, length=2048, vocab=51200):
    """A GPT graph as the tracer reports one (tied embedding, learned positions), fp16.

    A layer saves 34 s b h + 5 a s^2 b bytes without remat (Korthikanti et al. 2022: 10 s b h
    on `embed` activations and masks, 24 s b h on heads / mlp, 5 a s^2 b on attention scores),
    22 s b h + 2 a s^2 b keeping matmul outputs only (its input; query, key, value, the
    scores, their product with value, the output projection, both MLP matmuls), its 2 s b h
    input with full remat; FLOPs 24 b s h^2 + 4 b s^2 h per layer forward."""
    bt, h = batch * length, hidden

    def t(axes, nbytes):
        return Tensor((), nbytes, axes)

    def p(path, shape, axes):
        return ParamInfo(path, shape, "float16", axes)

    seq, qkv, mlp = ("batch", "length", "embed"), ("batch", "length", "heads", "kv"), \
        ("batch", "length", "mlp")
    scores = ("batch", "heads", "length", "length")
    block = "blocks/"
    params = tuple(p(block + name, (layers,) + shape, ("layers",) + axes) for name, shape, axes in (
        ("query", (h, heads, h // heads), ("embed", "heads", "kv")),
        ("key", (h, heads, h // heads), ("embed", "heads", "kv")),
        ("value", (h, heads, h // heads), ("embed", "heads", "kv")),
        ("out", (heads, h // heads, h), ("heads", "kv", "embed")),
        ("up", (h, 4 * h), ("embed", "mlp")), ("up_bias", (4 * h,), ("mlp",)),
        ("down", (4 * h, h), ("mlp", "embed")), ("down_bias", (h,), ("embed",)),
        ("norm1", (2, h), (None, "embed")), ("norm2", (2, h), (None, "embed"))))
    matmuls = tuple(Matmul(block + name, c, f, 2 * bt * h * w, 2 * bt * out, 2 * bt * inp)
                    for name, c, f, w, out, inp in (
        ("query", ("embed",), ("heads", "kv"), h, h, h),
        ("key", ("embed",), ("heads", "kv"), h, h, h),
        ("value", ("embed",), ("heads", "kv"), h, h, h),
        ("out", ("heads", "kv"), ("embed",), h, h, h),
        ("up", ("embed",), ("mlp",), 4 * h, 4 * h, h),
        ("down", ("mlp",), ("embed",), 4 * h, h, 4 * h)))
    saved = ((t(seq, 2 * bt * h),) * 4 + (t(seq, bt * h),) * 2 + (t(qkv, 2 * bt * h),) * 4
             + (t(scores, 2 * heads * length * bt), t(scores, heads * length * bt),
                t(scores, 2 * heads * length * bt)) + (t(mlp, 8 * bt * h),) * 2)
    dots = ((t(seq, 2 * bt * h),) * 3 + (t(qkv, 2 * bt * h),) * 4
            + (t(scores, 2 * heads * length * bt), t(mlp, 8 * bt * h)))
    blocks = Group("blocks", layers, params, matmuls, 24 * bt * h * h + 4 * bt * length * h,
                   saved, (t(seq, 2 * bt * h),), dots)
    logits = Matmul("embed/table", ("embed",), ("vocab",), 2 * bt * h * vocab, 2 * bt * vocab,
                    2 * bt * h)
    loss = (t(seq, 2 * bt * h), t(("batch", "length", "vocab"), 4 * bt * vocab),
            t(("batch", "length"), 4 * bt))
    embed = Group("embed", 1, (p("embed/table", (vocab, h), ("vocab", "embed")),), (logits,),
                  logits.flops, loss, loss, loss)
    positions = Group("positions", 1, (p("positions", (length, h), ("length", "embed")),), (),
                      0.0, (), (), ())
    norm = (t(seq, 2 * bt * h), t(("batch", "length"), 8 * bt))
    final = Group("final_norm", 1, (p("final_norm/scale", (h,), ("embed",)),
                                    p("final_norm/bias", (h,), ("embed",))), (), 0.0, norm, norm,
                  norm)
    return ModelGraph((embed, positions, blocks, final), batch, 2 * bt * 4)


def megatron_table(path: Path) -> list[dict[str, int | float]]:
    """The rows of a CSV shaped like data/megatron_gpt_configs.csv (comment lines skipped)."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    return [{k: float(v) if k == "params_billion" else int(v) for k, v in row.items()}
            for row in csv.DictReader(lines)]


def row_graph(row: dict) -> ModelGraph:
    """The row's GPT (sequence 2048, vocabulary 51200, the paper's global batch)."""
    return gpt_graph(row["hidden"], row["heads"], row["layers"], row["global_batch"])


def paper_step(graph: ModelGraph, cluster: Cluster, row: dict) -> float:
    """The paper's own (t, p, d = gpus / (t p)) priced by the same model: microbatch 1, full
    remat, no ZeRO (as Megatron-LM ran in 2021). Table 1 does not say which runs interleaved,
    so 1F1B and interleaved 1F1B with every v Megatron-LM accepts (equal chunks: p v
    divides the layers; the schedule takes m) are priced and the fastest counts."""
    n, t, p = row["gpus"], row["t"], row["p"]
    d = n // (t * p)
    m = graph.batch_size // d
    if p == 1:
        plan = named_plan(f"dp{d}+tp{t}", n, remat=True, microbatches=m).bind(graph.params)
        predicted = predict(graph, plan, cluster, MIXED)
        if predicted.total_bytes > cluster.memory_bytes:
            raise PlanError(f"the paper's dp{d}+tp{t} needs {format_bytes(predicted.total_bytes)}"
                            f" per device under this model; the budget is "
                            f"{format_bytes(cluster.memory_bytes)}")
        return predicted.step_s
    steps = []
    layers = row["layers"]
    options = [("1f1b", 1)] + [("interleaved_1f1b", v) for v in range(2, layers // p + 1)
                               if layers % (p * v) == 0]
    for schedule, v in options:
        if schedule_allows(schedule, p, m, v):
            steps.append(evaluate_pipeline(graph, cluster, p=p, v=v, m=m, schedule=schedule,
                                           mesh=f"dp{d}+tp{t}",
                                           options=MIXED).predicted.step_s)
    return min(steps)
