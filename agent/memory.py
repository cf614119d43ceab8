"""Keep the agent's resident memory small on devices where every megabyte counts.

Two glibc knobs, applied when glibc is there (a no-op elsewhere):
- fewer malloc arenas: each thread that allocates (runtime pools, gRPC, model workers) would
  otherwise get an arena of its own whose freed pages stay resident;
- `malloc_trim` after models load and after bursts of requests: graph optimisation and request
  buffers free a lot of memory that the heap keeps unless asked to return it.

Not pinned: glibc's mmap threshold. Pinning it low returns tensor-sized buffers to the system
after each request, but then every request maps and faults them in again (about 600 page faults
per 600 KB image request, for 1.5 MiB of resident memory saved): latency matters more.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h

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


def tune_allocator(arenas: int = 2) -> bool:
    """Call once at start, before the threads that allocate exist."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Free unreachable reference cycles, then return the heap's free pages to the system.

    Cycles first: a request cut short (a client gone mid-call) leaves its exception, traceback
    and frames, and with them its tensors, in a cycle that only the cyclic collector frees; after
    a burst of 600 KB image requests that held ~60 MB that no trim could return.
    """
    gc.collect()
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))
