"""What a planner predicts of a plan (`Predicted`) and the runners-up it weighed against it
(`Alternative`), with the table `Plan.explain()` prints of them. Pure data, no jax."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from jaxpar.planners.units import format_bytes


@dataclasses.dataclass(frozen=True)
class Predicted:
    """What a cost model expects of the plan, per device."""

    memory_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    compute_s: float = 0.0
    communication_s: float = 0.0
    collective_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    source: str = ""
    gap: float | None = None  # relative MIP gap of the search that chose the plan; 0: optimal
    # pipelined plans: the step in each form priced, and each stage's per-device bytes
    # (memory_bytes is the largest stage's; compute_s the pipeline, communication_s the sync)
    forms: dict[str, float] = dataclasses.field(default_factory=dict)
    stage_bytes: tuple[float, ...] = ()

    @property
    def step_s(self) -> float:
        return self.compute_s + self.communication_s

    @property
    def total_bytes(self) -> float:
        return sum(self.memory_bytes.values())


@dataclasses.dataclass(frozen=True)
class Alternative:
    """A plan the search weighed against the chosen one, and why it lost."""

    name: str
    step_s: float
    memory_bytes: float
    reason: str


def runners_up(alternatives: Sequence[Alternative], unit: str) -> list[str]:
    """The table of runners-up `explain()` prints: name, step time in `unit` (ms or s),
    memory per device (with its unit; "-" when not priced) and why each lost."""
    if not alternatives:
        return []
    scale = {"ms": 1e3, "s": 1.0}[unit]
    width = max(len("runner-up"), *(len(a.name) for a in alternatives))
    lines = [f"  {'runner-up'.ljust(width)}  {'step ' + unit:>9}  {'memory':>11}  why it lost"]
    for a in alternatives:
        memory = format_bytes(a.memory_bytes) if math.isfinite(a.memory_bytes) else "-"
        lines.append(f"  {a.name.ljust(width)}  {a.step_s * scale:9.4g}  {memory:>11}  "
                     f"{a.reason}")
    return lines


def explanation(name: str, predicted: Predicted | None, pipeline: Any,
                alternatives: Sequence[Alternative]) -> str:
    """`Plan.explain()` of the plan `name` with these fields: its prediction (for a
    `pipeline`: its form, bubble and stages), then the runners-up and why each lost."""
    if predicted is None:
        return f"Plan {name or '(unnamed)'} was given by hand: nothing was searched."
    pr, pp = predicted, pipeline
    unit = "s" if pr.step_s >= 1 else "ms"
    scale = {"ms": 1e3, "s": 1.0}[unit]
    gap = ("not proven optimal: pruned search" if pr.gap is None else
           "proven optimal" if pr.gap == 0 else f"MIP gap {pr.gap:.2%}")
    where = " on its largest stage" if pp is not None else ""
    lines = [f"Plan {name}: predicted step {pr.step_s * scale:.4g} {unit}, "
             f"{format_bytes(pr.total_bytes)} per device{where} ({gap})"]
    if pp is not None:
        bubble = "" if pp.bubble is None else f", bubble {pp.bubble:.1%}"
        lines.append(f"  pipeline {pr.compute_s * scale:.4g} {unit} in the "
                     f"{pp.form.upper()} form{bubble}; gradient sync "
                     f"{pr.communication_s * scale:.4g} {unit}")
        for form, step in pr.forms.items():
            lines.append(f"  {form.upper()} form: {step * scale:.4g} {unit}"
                         + (" (chosen)" if form == pp.form else ""))
        if list(pr.forms) == ["mpmd"]:
            lines.append("  SPMD form not priced: it needs equal chunks and ZeRO 0")
        if pr.stage_bytes:
            lines.append("  memory per device by stage: "
                         + ", ".join(format_bytes(b) for b in pr.stage_bytes))
    return "\n".join(lines + runners_up(alternatives, unit))

