"""The host allocator for training and evaluation on the CPU.

glibc's malloc serves a large block (over its mmap threshold, which grows only up to 32 MB) with a fresh
mmap and unmaps it on free, and gives the top of its heap back to the OS past the trim threshold. A CPU
training step allocates and frees its activations, logits and gradients (tens to hundreds of MB) every
step, so every page of them was faulted in again every step: on the 2-core dev machine the demo took
205 million minor page faults, 461 s of its 1,148 s of CPU time in the kernel (perf/NOTES.md, twenty-third
session). Keeping freed memory in the heap (no mmap below 2 GB, trim only past 2 GB free at the top) keeps
the pages mapped: the same run at ~1.8× the tokens/s, same losses (CPU perplexity eval: 36 → 24 s). The cost
is that the process keeps its peak heap until it exits.

Applied only in the main thread's heap: the pretrain/fine-tune process (`init_distributed` on the CPU) and
`tinyllama eval` (after the load, so the load's temporaries are still given back); not in serve, whose model
runs in a thread with its own 64 MB heaps that these settings do not reach. Only with glibc ≥ 2.35 (older ones
refuse a threshold over 32 MB, which alone does not help), and never over the user's choice:
TINYLLAMA_SYSTEM_MALLOC=1, the variables or glibc.malloc tunables for these same settings, or another
allocator in LD_PRELOAD (jemalloc, tcmalloc, mimalloc).
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP_SETTINGS = {
    M_MMAP_THRESHOLD: 2**31 - 1,  # blocks up to 2 GB come from the heap, not from a fresh mmap each time
    M_TRIM_THRESHOLD: 2**31 - 1,  # keep the heap's free top unless 2 GB of it is free (it is asked for next step)
    M_TOP_PAD: 256 * 2**20,  # grow the heap in 256 MB steps: fewer brk calls while it reaches its peak
}
OPT_OUT = "TINYLLAMA_SYSTEM_MALLOC"
USER_ALLOCATOR_ENV = (OPT_OUT, "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                 "glibc.malloc.mmap_max")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
MIN_GLIBC = (2, 35)  # glibc BZ 27801: before 2.35 mallopt refuses an mmap threshold over 32 MB

_applied: Optional[str] = None


def user_allocator_choice(environ=os.environ) -> Optional[str]:
    """The environment variable by which the user already chose these settings or the allocator, if any."""
    if environ.get(OPT_OUT, "") not in ("", "0"):
        return OPT_OUT
    for name in USER_ALLOCATOR_ENV[1:]:
        if name in environ:  # any value, 0 included, is the user's
            return name
    if any(tunable in environ.get("GLIBC_TUNABLES", "") for tunable in USER_TUNABLES):
        return "GLIBC_TUNABLES"
    preload = environ.get("LD_PRELOAD", "").lower()
    if any(lib in preload for lib in OTHER_ALLOCATORS):
        return "LD_PRELOAD"
    return None


def glibc_version() -> Optional[tuple[int, int]]:
    """(major, minor) of the glibc this process runs on; None without glibc (musl, macOS, Windows)."""
    try:
        version = ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError, TypeError):  # TypeError: Windows' CDLL takes no None
        return None
    version.restype = ctypes.c_char_p
    major, minor = version().decode().split(".")[:2]
    return int(major), int(minor)


def keep_freed_host_memory() -> str:
    """Set glibc malloc to keep freed blocks mapped (see the module docstring). Returns what happened:
    "kept" (set now or earlier in this process), or why not: "user chose via NAME", "not glibc",
    "glibc 2.34 < 2.35", "mallopt refused"."""
    global _applied
    if _applied is not None:
        return _applied
    chosen = user_allocator_choice()
    if chosen is not None:
        return f"user chose via {chosen}"
    version = glibc_version()
    if version is None:
        return "not glibc"
    if version < MIN_GLIBC:
        _applied = f"glibc {version[0]}.{version[1]} < {MIN_GLIBC[0]}.{MIN_GLIBC[1]}"
        return _applied
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [param for param, value in KEEP_SETTINGS.items() if mallopt(param, value) != 1]
    _applied = "kept" if not refused else f"mallopt refused {refused}"
    return _applied
