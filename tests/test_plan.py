"""The Plan as pure data: layout resolution, named plans, JSON, summary; no jax needed."""

import subprocess
import sys
from pathlib import Path

import pytest

from jaxpar.named import named_plan
from jaxpar.plan import DEFAULT_RULES, ParamInfo, Plan, PlanError, Predicted

KERNEL = ParamInfo("blocks/mlp/up/kernel", (4, 64, 256), "float32", ("layers", "embed", "mlp"))


def test_planning_modules_do_not_import_jax():
    """Every module under planners/ (found on disk, so a new one is covered), the Plan and
    the named plans import and plan without jax."""
    root = Path(__file__).resolve().parents[1] / "planners"
    modules = sorted("jaxpar.planners." + ".".join(f.relative_to(root).with_suffix("").parts)
                     for f in root.rglob("*.py") if f.name != "__init__.py")
    assert "jaxpar.planners.pipeline.search" in modules
    code = (f"import importlib, sys, jaxpar, jaxpar.plan, jaxpar.named, jaxpar.models.presets\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "jaxpar.named_plan('dp2+tp4', 8); print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_named_plans_share_one_rule_table_and_differ_in_mesh():
    plan = named_plan("dp2+fsdp2+tp2", 8)
    assert plan.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert named_plan("fsdp", 8).mesh_shape == {"fsdp": 8}
    assert named_plan("dp2+tp", 8).mesh_shape == {"data": 2, "tensor": 4}
    # activations: batch takes data and fsdp first, so embed stays whole
    assert plan.layout(("batch", "length", "embed")) == (("data", "fsdp"), (), ())
    # parameters: embed over fsdp (ZeRO-3), mlp over tensor (Megatron)
    assert plan.param_layout(KERNEL) == ((), ("fsdp",), ("tensor",))
    assert plan.shard_shape(KERNEL) == (4, 32, 128)


def test_a_mesh_is_any_ordered_subset_of_the_axis_vocabulary():
    assert named_plan("fsdp2+tp4", 8).mesh == (("fsdp", 2), ("tensor", 4))
    assert named_plan("tp2+pp2+dp", 8).mesh == (("stage", 2), ("data", 2), ("tensor", 2))
    full = Plan(mesh=(("data", 1), ("fsdp", 2), ("sequence", 1), ("tensor", 4), ("expert", 1)))
    reordered = Plan(mesh=(("tensor", 4), ("fsdp", 2)))
    for plan in (full, reordered):
        assert plan.param_layout(KERNEL) == named_plan("fsdp2+tp4", 8).param_layout(KERNEL)
        assert (plan.axis_size("fsdp"), plan.axis_size("data")) == (2, 1)
    for mesh, message in (((("model", 8),), "unknown mesh axis 'model'; name mesh axes from "
                           "stage, data, fsdp, sequence, tensor, expert"),
                          ((("data", 2), ("data", 4)), "repeat a name"),
                          ((("data", 2), ("stage", 4)), "`stage` must be the first"),
                          ((("data", 0),), "mesh axis 'data' has size 0")):
        with pytest.raises(PlanError, match=message):
            Plan(mesh=mesh).check([], [8], 8)


def test_an_axis_no_rule_names_is_refused_not_left_idle():
    with pytest.raises(PlanError, match="mesh axis sequence=2 is named by no rule"):
        named_plan("dp4+sp2", 8)
    rules = tuple((name, ("sequence",) if name == "length" else axes)
                  for name, axes in DEFAULT_RULES)
    plan = named_plan("dp4+sp2", 8, rules=rules)
    assert plan.layout(("batch", "length", "embed")) == (("data",), ("sequence",), ())


def test_group_rules_override_by_path():
    plan = Plan(mesh=(("data", 2), ("tensor", 4)),
                group_rules=((r"^embed/", (("vocab", ()), ("embed", ("tensor",)))),))
    table = ParamInfo("embed/embedding", (256, 64), "float32", ("vocab", "embed"))
    assert plan.param_layout(table) == ((), ("tensor",))
    assert plan.param_layout(KERNEL) == ((), (), ("tensor",))


def test_zero1_splits_optimizer_state_over_data_axes():
    plan = named_plan("dp4+tp2", 8, zero=1)  # data joins the largest local dimension, mlp
    assert plan.optimizer_layout(KERNEL) == ((), (), ("tensor", "data"))
    assert named_plan("dp4+tp2", 8).optimizer_layout(KERNEL) == plan.param_layout(KERNEL)


def test_json_round_trip_is_identity():
    plan = Plan(mesh=(("data", 2), ("fsdp", 2), ("tensor", 2)), zero=1, remat=True,
                microbatches=4, name="custom", params=(KERNEL,),
                group_rules=((r"embed", (("vocab", ("tensor",)), ("embed", ()))),),
                predicted=Predicted({"params": 1.0e9}, 0.5, 0.25, {"all-reduce": 2.0e9}, "test"))
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()


def test_remat_is_one_policy_of_three():
    assert [Plan(mesh=(("data", 8),), remat=r).remat for r in (False, True, "dots")] == [
        "none", "full", "dots"]
    plan = Plan(mesh=(("data", 8),), remat="dots")
    assert Plan.from_json(plan.to_json()).remat == "dots"
    with pytest.raises(PlanError, match="unknown remat policy 'selective'; use one of 'none', "
                                        "'dots', 'full'"):
        Plan(mesh=(("data", 8),), remat="selective")


def test_summary_lists_every_parameter_with_its_axes():
    plan = named_plan("fsdp2+tp4", 8).bind([KERNEL])
    text = str(plan)
    assert "mesh fsdp=2 x tensor=4 (8 devices)" in text
    row = next(line for line in text.splitlines() if KERNEL.path in line)
    assert row.split()[1:] == ["4x64x256", "layers,", "embed,", "mlp", "-,", "fsdp,", "tensor",
                               "4x32x64"]


def test_bind_rejects_a_mesh_axis_that_does_not_divide():
    with pytest.raises(PlanError, match="dimension 'mlp' has size 256, which mesh axes tensor"):
        named_plan("tp", 3).bind([KERNEL])


def test_check_is_the_one_validation_for_every_form():
    """Plan.check binds the parameter table and refuses, with the fix, what no form can run."""
    from jaxpar.plan import Pipeline

    bound = named_plan("fsdp2+tp4", 8).check([KERNEL], [16], 8)
    assert bound.params == (KERNEL,)
    cases = [
        (named_plan("dp8", 8), [16], 4, "has 8 devices but 4 are available"),
        (named_plan("dp8", 8, microbatches=0), [16], 8, "microbatches must be >= 1"),
        (named_plan("dp8", 8, zero=2), [16], 8, "zero 0 or 1"),
        (named_plan("dp8", 8, microbatches=4), [16], 8, "use a batch of 32"),
        (named_plan("dp8", 8), [16, 12], 8, "batch size 12 is not divisible"),
        (named_plan("pp2+dp4", 8, zero=1, pipeline=Pipeline(form="spmd")), [16], 8,
         "use zero=0 or form='mpmd'"),
        (named_plan("pp2+dp4", 8, pipeline=Pipeline(form="spmd", cut=(1, 3))), [16], 8,
         "needs equal chunks"),
        (named_plan("pp2+dp4", 8, pipeline=Pipeline(form="spmd")), [16], 8,
         "remat='none': use remat='dots' or 'full'"),
    ]
    for plan, batches, devices, message in cases:
        with pytest.raises(PlanError, match=message):
            plan.check([KERNEL], batches, devices, layers=4)
    # the MPMD form runs ZeRO-1 and uneven cuts
    mpmd = named_plan("pp2+dp4", 8, zero=1, pipeline=Pipeline(cut=(1, 3)))
    assert mpmd.check([KERNEL], [16], 8, layers=4).params == (KERNEL,)
