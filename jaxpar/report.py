"""Benchmark output: JSON-safe values and plain-text tables."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np


def json_safe(x: Any) -> Any:
    """NaN and inf become None, numpy scalars Python numbers, tuples lists."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run_meta(script: str) -> dict:
    """What every benchmark records about its run: the command, date, versions, machine."""
    return {"command": " ".join(["python", script, *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jax": jax.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "devices": jax.device_count()}


def write_result(result: dict, out: Path, wall_s: float) -> None:
    """Write a benchmark's result as JSON (wall time in its meta) and print its targets."""
    result["meta"]["wall_s"] = wall_s
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(result), indent=1) + "\n")
    print(f"\ntargets: {json.dumps(json_safe(result['targets']))}")
    print(f"wrote {out} in {wall_s:.0f} s")


def text_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table, numbers right-aligned."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w)
                               for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """The same table in Markdown, for docs written from a stored result."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows])


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return "-" if not math.isfinite(c) else f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}"
    return "-" if c is None else str(c)


def _numeric(c: str) -> bool:
    try:
        float(c.rstrip("%x"))
        return True
    except ValueError:
        return False
