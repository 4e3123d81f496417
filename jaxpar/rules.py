"""Logical-axis rules resolved to mesh axes, as Flax resolves them: pure data, no jax.

A tensor names each dimension with a logical axis ("batch", "embed", ...); ordered rules map
each name to mesh axes. `resolve` is memoised across plans: planners price the same layouts
hundreds of thousands of times, on plans that differ only in fields a layout does not read.

A dimension named in `FIT_TO_SIZE` (key / value heads) whose size the mesh axes of its rule
do not divide is laid out over the largest sub-tuple of them that does, often none: with
fewer key / value heads than the tensor degree, Megatron and MaxText replicate them over
the tensor group. Every other name keeps the divisibility error (`Plan.check_param`), since
silently replicating it would hide a mistake in the rules or the mesh.
"""

from __future__ import annotations

import functools
import itertools
import math
import re

# Ordered logical-axis rules, Flax `logical_axis_rules` form: (logical name, mesh axes).
Rules = tuple[tuple[str, tuple[str, ...]], ...]
# One entry per tensor dimension: the mesh axes it is split over (empty = replicated).
Layout = tuple[tuple[str, ...], ...]


class NoRule(KeyError):
    """A logical axis name no rule maps; its argument is the name."""


def as_rules(raw) -> Rules:
    """Rules from any nesting of sequences (lists from JSON or a user)."""
    return tuple((name, tuple(axes)) for name, axes in raw)


@functools.lru_cache(maxsize=65536)
def rules_for(rules: Rules, group_rules: tuple[tuple[str, Rules], ...],
              path: str | None) -> Rules:
    """The rules of the parameter at `path`: the first group whose pattern it matches."""
    if path is not None:
        for pattern, group in group_rules:
            if re.search(pattern, path):
                return group
    return rules


# Logical names whose dimension is fitted to its size (see the module docstring).
FIT_TO_SIZE = frozenset({"kv_heads"})


def resolve(mesh: tuple[tuple[str, int], ...], rules: Rules,
            logical_axes: tuple[str | None, ...],
            shape: tuple[int, ...] | None = None) -> Layout:
    """Each dimension's mesh axes: rules in order, each logical name takes the first rule
    whose mesh axes this tensor has not used yet; mesh axes of size 1 (or absent) drop out.
    Given the tensor's `shape`, a dimension named in `FIT_TO_SIZE` takes the largest
    sub-tuple of its rule's mesh axes that divides its size (`fit`). Raises NoRule for a
    name without a rule."""
    if shape is not None and FIT_TO_SIZE.isdisjoint(logical_axes):
        shape = None  # the layout does not depend on it: one cache entry for every shape
    return _resolve(mesh, rules, logical_axes, shape)


@functools.lru_cache(maxsize=65536)
def _resolve(mesh: tuple[tuple[str, int], ...], rules: Rules,
             logical_axes: tuple[str | None, ...], shape: tuple[int, ...] | None) -> Layout:
    known = {name for name, _ in rules}
    for name in logical_axes:
        if name is not None and name not in known:
            raise NoRule(name)
    sizes = dict(mesh)
    resolved: list[tuple[str, ...] | None] = [None] * len(logical_axes)
    used: set[str] = set()
    for rule_name, mesh_axes in rules:
        mesh_axes = tuple(a for a in mesh_axes if sizes.get(a, 1) > 1)
        for i, name in enumerate(logical_axes):
            if name != rule_name or resolved[i] is not None:
                continue
            if used.isdisjoint(mesh_axes):
                axes = mesh_axes
                if shape is not None and name in FIT_TO_SIZE:
                    axes = fit(sizes, mesh_axes, shape[i])
                resolved[i] = axes
                used.update(axes)
    return tuple(r or () for r in resolved)


def fit(sizes: dict[str, int], mesh_axes: tuple[str, ...], dim: int) -> tuple[str, ...]:
    """The sub-tuple of `mesh_axes` (in their order) with the largest product of `sizes`
    that divides `dim`; of equal products the longest, then the first."""
    best, best_size = (), 1
    for k in range(len(mesh_axes), 0, -1):
        for sub in itertools.combinations(mesh_axes, k):
            size = math.prod(sizes[a] for a in sub)
            if dim % size == 0 and size > best_size:
                best, best_size = sub, size
    return best
