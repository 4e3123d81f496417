"""How a plan pipelines its layer stack: the schedules, the two runtime forms, the cut.

Pure data, no jax, like the Plan that holds it.
"""

from __future__ import annotations

import dataclasses

from jaxpar.errors import PlanError

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble_h1")
FORMS = ("mpmd", "spmd")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """How a plan pipelines its layer stack over the `stage` mesh axis (p = its size).

    The stack is cut into p * `virtual` chunks, `cut` layers each (empty: equal chunks);
    chunk c runs on stage c mod p, whose devices are the mesh's slice at `stage` = c mod p
    (its submesh). The plan's `microbatches` are the pipeline's microbatches; `schedule` says
    in which order each stage runs them. `form` "mpmd" runs one jitted program per chunk
    and pass, each on its submesh, driven from Python; "spmd" one program over the whole
    mesh that steps through the schedule tick by tick. `bubble` is the planner's
    predicted idle fraction (None for a plan given by hand).
    """

    schedule: str = "1f1b"
    virtual: int = 1
    form: str = "mpmd"
    cut: tuple[int, ...] = ()
    bubble: float | None = None

    def check(self, stages: int) -> None:
        """Raise PlanError unless the schedule, form and cut make sense for p `stages`."""
        if self.schedule not in SCHEDULES:
            raise PlanError(f"unknown pipeline schedule {self.schedule!r}; use one of "
                            f"{', '.join(SCHEDULES)}")
        if self.form not in FORMS:
            raise PlanError(f"unknown pipeline form {self.form!r}; use one of {', '.join(FORMS)}")
        if self.virtual < 1 or (self.virtual > 1) != (self.schedule == "interleaved_1f1b"):
            raise PlanError(f"virtual={self.virtual} with schedule {self.schedule!r}: "
                            "interleaved_1f1b needs virtual >= 2, the other schedules 1")
        if self.cut and len(self.cut) != stages * self.virtual:
            raise PlanError(f"the cut has {len(self.cut)} chunks but the pipeline has "
                            f"{stages} stages x {self.virtual} virtual = "
                            f"{stages * self.virtual}; give one layer count per chunk")
        if self.cut and min(self.cut) < 1:
            raise PlanError(f"cut {self.cut}: every chunk needs at least one layer")

    def chunk_layers(self, stages: int, layers: int) -> tuple[int, ...]:
        """Layers per chunk for a stack of `layers`; equal chunks unless `cut` says."""
        chunks = stages * self.virtual
        if self.cut:
            if sum(self.cut) != layers:
                raise PlanError(f"the cut {self.cut} covers {sum(self.cut)} layers but the "
                                f"model's stack has {layers}")
            return self.cut
        if layers % chunks:
            raise PlanError(f"{layers} layers do not divide into {stages} stages x "
                            f"{self.virtual} virtual = {chunks} equal chunks; use a chunk "
                            f"count dividing {layers} or give an explicit cut")
        return (layers // chunks,) * chunks


