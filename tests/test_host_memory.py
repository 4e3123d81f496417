"""jaxpar.host_memory: on glibc, parallelize makes malloc keep freed memory for reuse."""

import ctypes
import ctypes.util

from jaxpar import host_memory


def _mmapped_bytes() -> int:
    """Bytes glibc currently serves through mmap (mallinfo2's hblkhd)."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2().hblkhd


def test_large_allocations_come_from_the_heap_once_set(monkeypatch):
    monkeypatch.delenv("JAXPAR_KEEP_FREED_MEMORY", raising=False)
    host_memory.keep_freed_memory.cache_clear()
    assert host_memory.keep_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    before = _mmapped_bytes()
    block = libc.malloc(64 << 20)  # far above glibc's largest mmap threshold (32 MiB)
    try:
        assert _mmapped_bytes() == before  # not a fresh mapping, freed back to the system
    finally:
        libc.free(ctypes.c_void_p(block))


def test_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("JAXPAR_KEEP_FREED_MEMORY", "0")
    host_memory.keep_freed_memory.cache_clear()
    try:
        assert not host_memory.keep_freed_memory()
    finally:
        host_memory.keep_freed_memory.cache_clear()
