"""On the CPU backend, keep the memory a step frees for the next step.

XLA's CPU runtime takes each step's buffers from the C library's malloc. glibc serves
allocations above its mmap threshold (at most 32 MiB, adjusted as the process runs) with
fresh `mmap`s and returns them to the system when freed, so a step whose temporaries exceed
it faults in every page of them again, every step. How often that happens depends on what
else the process allocated before, so the same program's step time varies between
processes by tens of percent. With mmap off and a high trim threshold, freed memory stays
in the heap and the next step reuses it: the small GPT's dp2+tp4 step on 8 CPU devices
drops from about 220 ms to about 145 ms (scripts/bench_peers.py runs MaxText under the
same setting).

`keep_freed_memory()` is called by `jaxpar.parallelize` for CPU devices; it changes the
process's malloc settings, once. Set JAXPAR_KEEP_FREED_MEMORY=0 to leave them alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# glibc's mallopt parameters, and the same settings as environment variables (read when a
# process starts) for processes jaxpar launches
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_THRESHOLD = 2**31 - 1  # bytes of free heap top kept before returning it (mallopt: int)
ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD)}


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring); whether
    it did (False off glibc, or when JAXPAR_KEEP_FREED_MEMORY=0)."""
    if os.environ.get("JAXPAR_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to tune
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
