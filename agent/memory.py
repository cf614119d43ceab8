"""Keep the agent's resident memory small on devices where every megabyte counts.

Three glibc knobs, applied when glibc is there (a no-op elsewhere):
- fewer malloc arenas: each thread that allocates (runtime pools, gRPC, model workers) would
  otherwise get an arena of its own whose freed pages stay resident;
- a fixed mmap threshold: by default glibc raises it after the first large buffer is freed, so
  every later tensor-sized buffer (a 600 KB image) comes from the heap and stays resident;
- `malloc_trim` after models load: graph optimisation frees a lot of temporary memory that the
  heap keeps unless asked to return it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameter numbers, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _libc = libc if libc is not None and hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def tune_allocator(arenas: int = 2, mmap_threshold: int = 256 * 1024) -> bool:
    """Call once at start, before the threads that allocate exist."""
    libc = _glibc()
    if not libc:
        return False
    return bool(
        libc.mallopt(_M_ARENA_MAX, arenas) and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    )


def release_free_memory() -> bool:
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
