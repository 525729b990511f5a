"""The host allocator for model work on the CPU (training, eval, generation, serving).

glibc's malloc serves a large block (over its mmap threshold, which grows only up to 32 MB) with a fresh
mmap and unmaps it on free, and gives the top of its heap back to the OS past the trim threshold. A CPU
training step allocates and frees its activations, logits and gradients (tens to hundreds of MB) every
step, so every page of them was faulted in again every step: on the 2-core dev machine the demo took
205 million minor page faults, 461 s of its 1,148 s of CPU time in the kernel (perf/NOTES.md, twenty-third
session). Keeping freed memory in the heap (no mmap below 2 GB, no trim) makes the pages stay mapped:
the same run at ~2× the tokens/s, same losses (CPU perplexity eval: 36 → 27 s). The cost is that the
process keeps its peak heap until it exits; inference applies it after loading the model, so the load's
temporaries are still given back.

It is applied once per process, only with glibc, and never over a choice the user made: any MALLOC_*_
variable, glibc.malloc tunables in GLIBC_TUNABLES, or another allocator in LD_PRELOAD (jemalloc, tcmalloc,
mimalloc) leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP_SETTINGS = {
    M_MMAP_THRESHOLD: 2**31 - 1,  # blocks up to 2 GB come from the heap, not from a fresh mmap each time
    M_TRIM_THRESHOLD: 2**31 - 1,  # never give the heap's top back (it is asked for again next step)
    M_TOP_PAD: 256 * 2**20,  # grow the heap in 256 MB steps: fewer brk calls while it reaches its peak
}
USER_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied: Optional[str] = None


def user_allocator_choice(environ=os.environ) -> Optional[str]:
    """The environment variable by which the user already chose the allocator's behaviour, if any."""
    for name in USER_ALLOCATOR_ENV:
        if name in environ:
            return name
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = environ.get("LD_PRELOAD", "").lower()
    if any(lib in preload for lib in OTHER_ALLOCATORS):
        return "LD_PRELOAD"
    return None


def keep_freed_host_memory(environ=os.environ) -> str:
    """Set glibc malloc to keep freed blocks mapped (see the module docstring). Returns what happened:
    "kept" (set now or earlier in this process), or why not ("not glibc", "user chose via NAME",
    "mallopt refused")."""
    global _applied
    if _applied is not None:
        return _applied
    chosen = user_allocator_choice(environ)
    if chosen is not None:
        return f"user chose via {chosen}"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl and macOS have other allocators and no such knobs
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows' CDLL takes no None
        return "not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in KEEP_SETTINGS.items())
    _applied = "kept" if ok else "mallopt refused"
    return _applied
