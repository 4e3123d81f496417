"""Named plans: a hand-picked layout from a spec such as "dp2+tp4" (see `named_plan`)."""

from __future__ import annotations

import math
import re

from jaxpar.plan import Pipeline, Plan, PlanError

SPEC_AXES = {"pp": "stage", "dp": "data", "fsdp": "fsdp", "tp": "tensor"}
MESH_AXIS_ORDER = ("data", "fsdp", "tensor")  # `stage` goes first when the plan pipelines


def named_plan(spec: str, num_devices: int, **options) -> Plan:
    """A hand-picked plan from a spec such as "dp", "fsdp8", "dp2+tp4" or "dp2+fsdp2+tp2".

    Components are pp (stage), dp (data), fsdp (fsdp) and tp (tensor), each with an
    optional size; one component may omit its size and takes the devices the others leave.
    `options` are Plan fields (zero, remat, microbatches, rules, pipeline); a plan with pp
    gets `Pipeline()` (1F1B, MPMD) unless `pipeline` is given.
    """
    sizes: dict[str, int | None] = {}
    for part in spec.split("+"):
        m = re.fullmatch(r"(pp|dp|fsdp|tp)(\d*)", part.strip())
        if m is None or SPEC_AXES[m.group(1)] in sizes:
            raise PlanError(
                f"unknown plan {spec!r}: write components pp, dp, fsdp, tp joined by '+', each "
                f"at most once with an optional size, e.g. 'dp2+tp4'"
            )
        sizes[SPEC_AXES[m.group(1)]] = int(m.group(2)) if m.group(2) else None
    open_axes = [a for a, s in sizes.items() if s is None]
    if len(open_axes) > 1:
        raise PlanError(f"plan {spec!r}: give sizes to all components but one")
    fixed = math.prod(s for s in sizes.values() if s is not None)
    if open_axes:
        if num_devices % fixed:
            raise PlanError(
                f"plan {spec!r}: fixed sizes multiply to {fixed}, which does not divide "
                f"{num_devices} devices"
            )
        sizes[open_axes[0]] = num_devices // fixed
    mesh = tuple((axis, sizes.get(axis) or 1) for axis in MESH_AXIS_ORDER)
    if "stage" in sizes:
        mesh = (("stage", sizes["stage"]),) + mesh
        options.setdefault("pipeline", Pipeline())
    plan = Plan(mesh=mesh, name=spec, **options)
    plan.check_devices(num_devices)
    plan.check_pipeline()
    return plan
