"""Logical-axis rules resolved to mesh axes, as Flax resolves them: pure data, no jax.

A tensor names each dimension with a logical axis ("batch", "embed", ...); ordered rules map
each name to mesh axes. `resolve` is memoised across plans: planners price the same layouts
hundreds of thousands of times, on plans that differ only in fields a layout does not read.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=65536)
def resolve(mesh: tuple[tuple[str, int], ...], rules: Rules,
            logical_axes: tuple[str | None, ...]) -> Layout:
    """Each dimension's mesh axes: rules in order, each logical name takes the first rule
    whose mesh axes this tensor has not used yet; mesh axes of size 1 (or absent) drop out.
    Raises NoRule for a name without a rule."""
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
                resolved[i] = mesh_axes
                used.update(mesh_axes)
    return tuple(r or () for r in resolved)
