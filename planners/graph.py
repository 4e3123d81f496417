"""ModelGraph: what the planner knows of a model, as plain data (no jax).

jaxpar traces the user's loss into this (jaxpar/graph.py); planner tests build it by hand.
A model is a sequence of layer groups; a group with `repeat` > 1 is a stack of identical
layers (the `layers` logical axis). Every figure is for the example batch the model was
traced with, for one layer of the group.
"""

from __future__ import annotations

import dataclasses
import json

from jaxpar.plan import ParamInfo


@dataclasses.dataclass(frozen=True)
class Matmul:
    """A contraction with a parameter operand: `param` is its path; `contracting` and `free`
    are the logical axes of the parameter's contracted and kept dimensions; `out_bytes` and
    `in_bytes` are the sizes of the output and of the other (activation) operand."""

    param: str
    contracting: tuple[str | None, ...]
    free: tuple[str | None, ...]
    flops: float
    out_bytes: float
    in_bytes: float


@dataclasses.dataclass(frozen=True)
class Tensor:
    """An activation autodiff saves: one layer's shape, its bytes and the logical axis of
    each dimension (None where the trace could not tell)."""

    shape: tuple[int, ...]
    nbytes: float
    logical_axes: tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class Group:
    """One layer group: its parameters (full shapes, stacked ones with the `layers` axis
    first), the matmuls of one layer, its forward FLOPs (all contractions, attention's too)
    and one layer's activations autodiff saves for backward under each remat policy
    (`plan.REMAT`: `saved` without remat, `saved_dots` keeping matmul outputs only,
    `saved_remat` under full remat)."""

    name: str
    repeat: int
    params: tuple[ParamInfo, ...]
    matmuls: tuple[Matmul, ...]
    flops_fwd: float
    saved: tuple[Tensor, ...]
    saved_remat: tuple[Tensor, ...]
    saved_dots: tuple[Tensor, ...]

    @property
    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    @property
    def saved_bytes(self) -> float:
        return sum(t.nbytes for t in self.saved)

    @property
    def saved_bytes_remat(self) -> float:
        return sum(t.nbytes for t in self.saved_remat)

    def saved_under(self, remat: str) -> tuple[Tensor, ...]:
        """What one layer saves for backward under the remat policy `remat`."""
        return {"none": self.saved, "dots": self.saved_dots, "full": self.saved_remat}[remat]


@dataclasses.dataclass(frozen=True)
class ModelGraph:
    groups: tuple[Group, ...]
    batch_size: int
    batch_bytes: int

    @property
    def flops_fwd(self) -> float:
        return sum(g.flops_fwd * g.repeat for g in self.groups)

    @property
    def param_bytes(self) -> int:
        return sum(g.param_bytes for g in self.groups)

    @property
    def params(self) -> tuple[ParamInfo, ...]:
        return tuple(p for g in self.groups for p in g.params)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelGraph:
        d = json.loads(text)
        groups = []
        for g in d["groups"]:
            params = tuple(ParamInfo(p["path"], tuple(p["shape"]), p["dtype"],
                                     tuple(p["logical_axes"])) for p in g["params"])
            matmuls = tuple(Matmul(m["param"], tuple(m["contracting"]), tuple(m["free"]),
                                   m["flops"], m["out_bytes"], m["in_bytes"]) for m in g["matmuls"])
            saved = {k: tuple(Tensor(tuple(t["shape"]), t["nbytes"], tuple(t["logical_axes"]))
                              for t in g[k]) for k in ("saved", "saved_remat", "saved_dots")}
            groups.append(Group(g["name"], g["repeat"], params, matmuls, g["flops_fwd"],
                                saved["saved"], saved["saved_remat"], saved["saved_dots"]))
        return cls(tuple(groups), d["batch_size"], d["batch_bytes"])
