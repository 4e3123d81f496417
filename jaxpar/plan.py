"""The Plan: how a training step is laid out on a device mesh.

A Plan is pure data (no jax import): the only contract between the planners that
choose it and the emitter that runs it. It round-trips through JSON and prints as a
table of parameters with their logical and mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence

from jaxpar.errors import PlanError
from jaxpar.pipelining import Pipeline
from jaxpar.planners.units import format_bytes
from jaxpar.predicted import Alternative, Predicted, explanation
from jaxpar.rules import FIT_TO_SIZE, Layout, NoRule, Rules, as_rules, resolve, rules_for

# The one rule table shared by the named plans: a mesh axis of size 1 makes a rule a no-op,
# so dp, fsdp, tp and their mixes differ only in mesh sizes. Activations take `batch` first,
# which uses up `fsdp`, so only parameters shard `embed` over it (ZeRO-3 / FSDP). Key / value
# heads (`kv_heads`, fewer than the query `heads` under grouped-query attention) are split
# like heads where the tensor degree divides them, else replicated (`rules.FIT_TO_SIZE`).
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", ()),
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("expert", ()),
    ("kv", ()),
    ("embed", ("fsdp",)),
)

# The mesh axis vocabulary, outermost first, each with the prefix a plan's name gives it
# ("dp2+tp4"). A plan's mesh is any ordered subset; `stage` (the pipeline's) comes first.
MESH_AXES = {"stage": "pp", "data": "dp", "fsdp": "fsdp", "sequence": "sp", "tensor": "tp",
             "expert": "ep"}

# What a layer keeps from its forward pass for the backward, least recomputation first:
# "none" keeps every intermediate, "dots" only the outputs of its matmuls (jax's
# `checkpoint_policies.dots_saveable`: the elementwise work between them is recomputed),
# "full" only its input (the whole forward is recomputed). Under every policy a layer
# gathers its fsdp shards again in the backward pass rather than keeping them.
REMAT = ("none", "dots", "full")

# How the gradient of an fsdp-sharded parameter is reduced over its shards, per microbatch:
# "reduce-scatter" sums it into each device's shard (the all-gather's transpose);
# "all-reduce" sums it whole, and each device keeps its slice: twice the bytes, but a
# compiler that combines only independent all-reduces (XLA's CPU backend) then sends a
# layer's gradients as one collective instead of one per parameter.
GRAD_REDUCE = ("reduce-scatter", "all-reduce")

@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter as the plan sees it: path, global shape, dtype and logical axes."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    logical_axes: tuple[str | None, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_BYTES.get(self.dtype, 4)


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "float64": 8}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Mesh, logical-axis rules, ZeRO level, remat policy and microbatches of one training step.

    `rules` hold for every parameter and activation; `group_rules` override them for the
    parameters whose path matches a regular expression (first match wins).
    `zero`: 0 keeps optimizer state laid out like its parameter; 1 also splits it over
    the data-parallel mesh axes (ZeRO-1). Parameter sharding over `fsdp` is ZeRO-3.
    `remat`: what each layer saves for its backward pass, one of `REMAT` (True and False
    are read as "full" and "none"). `grad_reduce`: how fsdp-sharded gradients are reduced,
    one of `GRAD_REDUCE`.
    """

    mesh: tuple[tuple[str, int], ...]
    rules: Rules = DEFAULT_RULES
    group_rules: tuple[tuple[str, Rules], ...] = ()
    zero: int = 0
    remat: str = "none"
    microbatches: int = 1
    name: str = ""
    params: tuple[ParamInfo, ...] = ()
    predicted: Predicted | None = None
    alternatives: tuple[Alternative, ...] = ()
    pipeline: Pipeline | None = None
    grad_reduce: str = "reduce-scatter"

    def __post_init__(self):  # lists in, tuples kept: a Plan is hashable data
        object.__setattr__(self, "mesh", tuple((name, size) for name, size in self.mesh))
        object.__setattr__(self, "rules", as_rules(self.rules))
        object.__setattr__(self, "group_rules", tuple(
            (pattern, as_rules(r)) for pattern, r in self.group_rules))
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT:
            raise PlanError(f"unknown remat policy {self.remat!r}; use one of "
                            f"{', '.join(map(repr, REMAT))}")
        if self.grad_reduce not in GRAD_REDUCE:
            raise PlanError(f"unknown grad_reduce {self.grad_reduce!r}; use one of "
                            f"{', '.join(map(repr, GRAD_REDUCE))}")

    # ----------------------------------------------------------------- mesh
    @functools.cached_property
    def mesh_shape(self) -> dict[str, int]:
        """Axis name to size (read-only by convention: cached on the plan)."""
        return dict(self.mesh)

    def axis_size(self, axis: str) -> int:
        """The size of mesh axis `axis`; 1 when the mesh does not have it."""
        return self.mesh_shape.get(axis, 1)

    @property
    def num_devices(self) -> int:
        return math.prod(size for _, size in self.mesh)

    @property
    def stages(self) -> int:
        """Pipeline degree p: the size of the `stage` mesh axis (1 without one)."""
        return self.axis_size("stage")

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes the batch dimension is split over."""
        return self.layout(("batch",))[0]

    @property
    def data_parallel_size(self) -> int:
        return self._size(self.batch_axes)

    def _size(self, axes: Sequence[str]) -> int:
        return math.prod(self.mesh_shape[a] for a in axes)

    # --------------------------------------------------------------- layout
    def rules_for(self, path: str | None = None) -> Rules:
        return rules_for(self.rules, self.group_rules, path)

    def layout(self, logical_axes: Sequence[str | None], path: str | None = None,
               shape: Sequence[int] | None = None) -> Layout:
        """Mesh axes of each dimension, resolved as Flax does: rules in order, each logical
        name takes the first rule whose mesh axes this tensor has not used yet. Mesh axes
        of size 1 (and absent ones) drop out. Given the tensor's `shape`, a `kv_heads`
        dimension keeps only the mesh axes that divide it (`rules.FIT_TO_SIZE`)."""
        try:
            return resolve(self.mesh, self.rules_for(path), tuple(logical_axes),
                           None if shape is None else tuple(shape))
        except NoRule as missing:
            name = missing.args[0]
            where = f" of {path}" if path else ""
            raise PlanError(
                f"logical axis {name!r}{where} has no rule in the plan; add "
                f"({name!r}, ()) to replicate it or map it to mesh axes"
            ) from None

    def param_layout(self, info: ParamInfo) -> Layout:
        return self.layout(info.logical_axes, info.path, info.shape)

    def layout_note(self, info: ParamInfo) -> str:
        """Why `info` is not split as its rules say (`rules.FIT_TO_SIZE`), or "": e.g.
        "replicated over tensor: kv_heads 2 not divisible by 8"."""
        notes = []
        for name, dim, ruled, axes in zip(info.logical_axes, info.shape,
                                          self.layout(info.logical_axes, info.path),
                                          self.param_layout(info)):
            dropped = tuple(a for a in ruled if a not in axes)
            if name in FIT_TO_SIZE and dropped:
                notes.append(f"replicated over {'x'.join(dropped)}: {name} {dim} not "
                             f"divisible by {self._size(dropped)}")
        return "; ".join(notes)

    def optimizer_layout(self, info: ParamInfo) -> Layout:
        """Layout of the optimizer state of a parameter. ZeRO-1 adds the data-parallel axes
        the parameter does not use to its largest dimension they divide (if any)."""
        layout = self.param_layout(info)
        extra = tuple(a for a in self.batch_axes if a not in sum(layout, ()))
        if self.zero == 0 or self._size(extra) == 1:
            return layout
        free = [i for i, (d, axes) in enumerate(zip(info.shape, layout))
                if d % (self._size(axes) * self._size(extra)) == 0]
        if not free:
            return layout
        i = max(free, key=lambda j: info.shape[j] // self._size(layout[j]))
        return layout[:i] + (layout[i] + extra,) + layout[i + 1:]

    def shard_shape(self, info: ParamInfo) -> tuple[int, ...]:
        return tuple(
            d // self._size(axes) for d, axes in zip(info.shape, self.param_layout(info))
        )

    # ----------------------------------------------------------- validation
    def check_mesh(self) -> None:
        """Every axis is named from MESH_AXES once, with a positive size; `stage`, if there,
        comes first."""
        names = [name for name, _ in self.mesh]
        for name, size in self.mesh:
            if name not in MESH_AXES:
                raise PlanError(f"unknown mesh axis {name!r}; name mesh axes from "
                                f"{', '.join(MESH_AXES)}")
            if not isinstance(size, int) or size < 1:
                raise PlanError(f"mesh axis {name!r} has size {size!r}; give a positive integer")
        if len(set(names)) < len(names):
            raise PlanError(f"mesh axes {names} repeat a name; give each axis once")
        if "stage" in names[1:]:
            raise PlanError(f"mesh axes {names}: `stage` must be the first (outermost) axis")

    def check_devices(self, num_devices: int) -> None:
        if self.num_devices != num_devices:
            raise PlanError(
                f"the plan's mesh {self._mesh_str()} has {self.num_devices} devices but "
                f"{num_devices} are available; choose mesh sizes whose product is {num_devices}"
            )

    def check_pipeline(self) -> None:
        """A `stage` axis and a `pipeline` come together; the pipeline must be valid."""
        if self.pipeline is None:
            if self.stages > 1:
                raise PlanError(f"the mesh has stage={self.stages} but the plan has no pipeline;"
                                " set pipeline=Pipeline(...) or drop the stage axis")
            return
        if not self.mesh or self.mesh[0][0] != "stage":
            raise PlanError(f"a pipelined plan needs `stage` as its first mesh axis; got mesh "
                            f"{self._mesh_str()}")
        self.pipeline.check(self.stages)

    def check_axes_used(self) -> None:
        """Every mesh axis of size > 1 but `stage` is named by a rule: devices along an axis
        no rule splits anything over would all repeat the same work."""
        named = {a for _, axes in self.rules for a in axes}
        named |= {a for _, rules in self.group_rules for _, axes in rules for a in axes}
        idle = [f"{a}={s}" for a, s in self.mesh if s > 1 and a != "stage" and a not in named]
        if idle:
            raise PlanError(f"mesh axis {', '.join(idle)} is named by no rule, so every device "
                            "along it would repeat the same work; map a logical axis to it in "
                            "the rules or give it size 1")

    def check_param(self, info: ParamInfo) -> None:
        for dim, axes, name in zip(info.shape, self.param_layout(info), info.logical_axes):
            size = self._size(axes)
            if dim % size:
                raise PlanError(
                    f"{info.path}: dimension {name!r} has size {dim}, which mesh axes "
                    f"{'x'.join(axes)} (size {size}) do not divide; change the mesh or map "
                    f"{name!r} to other mesh axes"
                )

    def check_batch(self, batch_size: int) -> None:
        per_step = self.data_parallel_size * self.microbatches
        if batch_size % per_step:
            lower = max(per_step, batch_size // per_step * per_step)
            upper = (batch_size // per_step + 1) * per_step
            nearest = lower if batch_size - lower <= upper - batch_size else upper
            raise PlanError(
                f"batch size {batch_size} is not divisible by data-parallel size "
                f"{self.data_parallel_size} x microbatches {self.microbatches} = {per_step}; "
                f"use a batch of {nearest}"
            )

    def check(self, params: Sequence[ParamInfo], batch_sizes: Sequence[int], num_devices: int,
              layers: int | None = None) -> Plan:
        """The one validation of a plan against a model, a batch and the devices, for every
        form: the mesh's axes and device count, the pipeline, the knobs, every parameter,
        every batch leaf's leading size and (pipelined, given the stack's `layers`) the
        chunks the form can run. Returns the plan bound to `params`; raises PlanError naming
        the value, the limit and the fix."""
        self.check_mesh()
        self.check_devices(num_devices)
        self.check_pipeline()
        self.check_axes_used()
        if self.microbatches < 1 or self.zero not in (0, 1):
            raise PlanError(f"microbatches must be >= 1 (got {self.microbatches}) and zero 0 or 1"
                            f" (got {self.zero})")
        plan = self.bind(params)
        for size in batch_sizes:
            plan.check_batch(size)
        if self.pipeline is None or layers is None:
            return plan
        chunks = self.pipeline.chunk_layers(self.stages, layers)
        if self.pipeline.form == "spmd" and len(set(chunks)) > 1:
            raise PlanError(f"the SPMD pipeline needs equal chunks (one program runs every "
                            f"rank); the cut is {chunks}: drop the cut or use form='mpmd'")
        if self.pipeline.form == "spmd" and self.zero:
            raise PlanError(f"the SPMD pipeline keeps optimizer state laid out like its "
                            f"parameters; the plan has zero={self.zero}: use zero=0 or "
                            "form='mpmd'")
        if self.pipeline.form == "spmd" and self.remat == "none":
            raise PlanError("the SPMD pipeline copies each chunk's saved activations through "
                            "a buffer every tick, so it keeps matmul outputs at most; the "
                            "plan has remat='none': use remat='dots' or 'full', or "
                            "form='mpmd'")
        return plan

    def bind(self, params: Sequence[ParamInfo]) -> Plan:
        """This plan with the model's parameter table, every parameter checked."""
        for info in params:
            self.check_param(info)
        return dataclasses.replace(self, params=tuple(params))

    # ----------------------------------------------------------------- JSON
    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(dataclasses.asdict(self), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        d["params"] = tuple(
            ParamInfo(p["path"], tuple(p["shape"]), p["dtype"], tuple(p["logical_axes"]))
            for p in d["params"]
        )
        if d["predicted"] is not None:
            d["predicted"] = Predicted(**{**d["predicted"], "stage_bytes": tuple(
                d["predicted"].get("stage_bytes", ()))})
        d["alternatives"] = tuple(Alternative(**a) for a in d.get("alternatives", ()))
        if d.get("pipeline") is not None:
            d["pipeline"] = Pipeline(**{**d["pipeline"], "cut": tuple(d["pipeline"]["cut"])})
        return cls(**d)

    # ------------------------------------------------------------- printing
    def _mesh_str(self) -> str:
        return " x ".join(f"{name}={size}" for name, size in self.mesh)

    def summary(self) -> str:
        lines = [
            f"Plan {self.name or '(unnamed)'}: mesh {self._mesh_str()} "
            f"({self.num_devices} devices), zero={self.zero}, remat={self.remat}, "
            f"microbatches={self.microbatches}, grad_reduce={self.grad_reduce}"
        ]
        if self.pipeline is not None:
            pp = self.pipeline
            bubble = "" if pp.bubble is None else f", predicted bubble {pp.bubble:.1%}"
            cut = f", layers per chunk {list(pp.cut)}" if pp.cut else ""
            lines.append(f"  pipeline: {self.stages} stages ({self.num_devices // self.stages}"
                         f" devices each), schedule {pp.schedule}, virtual {pp.virtual}, "
                         f"form {pp.form}{cut}{bubble}")
        if self.params:
            rows = [("parameter", "shape", "logical axes", "mesh axes", "per-device", "note")]
            for p in self.params:
                layout = self.param_layout(p)
                rows.append((
                    p.path,
                    "x".join(map(str, p.shape)) or "scalar",
                    ", ".join(str(a) for a in p.logical_axes),
                    ", ".join("+".join(a) or "-" for a in layout),
                    "x".join(map(str, self.shard_shape(p))) or "scalar",
                    self.layout_note(p),
                ))
            if not any(r[-1] for r in rows[1:]):  # a note column only when there are notes
                rows = [r[:-1] for r in rows]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for r in rows:
                lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            total = sum(p.nbytes for p in self.params)
            local = sum(
                p.nbytes / self._size(sum(self.param_layout(p), ())) for p in self.params
            )
            lines.append(
                f"  parameters: {format_bytes(total)} in all, {format_bytes(local)} per device"
            )
        if self.predicted is not None:
            pr = self.predicted
            memory = ", ".join(f"{k} {format_bytes(v)}" for k, v in pr.memory_bytes.items())
            lines.append(
                f"  predicted: step {pr.step_s * 1e3:.1f} ms (compute {pr.compute_s * 1e3:.1f}, "
                f"communication {pr.communication_s * 1e3:.1f}); memory: {memory}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def explain(self) -> str:
        """Why this plan: its prediction (for a pipeline: its form, bubble and stages), then
        the runners-up and why each lost."""
        return explanation(self.name, self.predicted, self.pipeline, self.alternatives)
