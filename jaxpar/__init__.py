"""jaxpar: plan and run parallel training for JAX.

Importing `jaxpar` (or `jaxpar.plan`, `jaxpar.planners`) does not import jax: the names
that need it load on first use, so planning runs on a machine without accelerators.
"""

import importlib

_EXPORTS = {
    "Plan": "jaxpar.plan",
    "PlanError": "jaxpar.plan",
    "ParamInfo": "jaxpar.plan",
    "DEFAULT_RULES": "jaxpar.plan",
    "Predicted": "jaxpar.plan",
    "named_plan": "jaxpar.named",
    "Cluster": "jaxpar.planners.cluster",
    "local_cluster": "jaxpar.cluster.devices",
    "make_mesh": "jaxpar.emit.shardings",
    "calibrate": "jaxpar.cluster.calibration",
    "parallelize": "jaxpar.api",
    "auto_parallelize": "jaxpar.api",
    "Parallelized": "jaxpar.emit.parallelized",
    "TrainState": "jaxpar.emit.state",
    "constrain": "jaxpar.context",
    "layer": "jaxpar.context",
    "attention": "jaxpar.softmax_attention",
    "Pipeline": "jaxpar.plan",
    "Stages": "jaxpar.tracing.stages",
    "run_stack": "jaxpar.tracing.stages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxpar' has no attribute {name!r}")
