"""Named plans: a hand-picked layout from a spec such as "dp2+tp4" (see `named_plan`)."""

from __future__ import annotations

import math
import re

from jaxpar.plan import MESH_AXES, Pipeline, Plan, PlanError

SPEC_AXES = {prefix: axis for axis, prefix in MESH_AXES.items()}


def named_plan(spec: str, num_devices: int, **options) -> Plan:
    """A hand-picked plan from a spec such as "dp", "fsdp8", "dp2+tp4" or "dp2+fsdp2+tp2".

    Components are the prefixes of `plan.MESH_AXES` (pp: stage, dp: data, fsdp, sp:
    sequence, tp: tensor, ep: expert), each with an optional size; one component may omit
    its size and takes the devices the others leave. The mesh has the named axes only, in
    the vocabulary's order. `options` are Plan fields (zero, remat, microbatches, rules,
    pipeline); a plan with pp gets `Pipeline()` (1F1B, MPMD) unless `pipeline` is given.
    An axis no rule names is refused (with the default rules: sp and ep).
    """
    sizes: dict[str, int | None] = {}
    for part in spec.split("+"):
        m = re.fullmatch(r"([a-z]+)(\d*)", part.strip())
        if m is None or m.group(1) not in SPEC_AXES or SPEC_AXES[m.group(1)] in sizes:
            raise PlanError(
                f"unknown plan {spec!r}: write components {', '.join(SPEC_AXES)} joined by "
                f"'+', each at most once with an optional size, e.g. 'dp2+tp4'"
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
    if "stage" in sizes:
        options.setdefault("pipeline", Pipeline())
    plan = Plan(mesh=tuple((axis, sizes[axis]) for axis in MESH_AXES if axis in sizes),
                name=spec, **options)
    plan.check_mesh()
    plan.check_devices(num_devices)
    plan.check_pipeline()
    plan.check_axes_used()
    return plan
