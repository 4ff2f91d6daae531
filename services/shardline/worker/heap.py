"""The worker process's heap: keep freed memory for the next step instead of unmapping it.

Every step allocates and frees the same tensors (activations of up to a few MB per layer).
glibc serves allocations above its mmap threshold (128 KiB, adaptive up to 32 MiB) with fresh
mmaps and trims the heap top on free, so each step paid a page fault per 4 KiB touched:
a 512-token prefill step of SmolLM2 on 2 Sapphire Rapids cores took 160-190 ms that way and
~130 ms with the memory kept (benchmarks/model_step.py-style in-process runs, interleaved).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

_done = False


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 1 << 30,
                      top_pad: int = 64 << 20) -> bool:
    """Serve allocations below mmap_threshold from the heap and keep up to trim_threshold
    of freed memory there. Returns whether glibc took the settings (False elsewhere)."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False                     # not glibc (musl, macOS): nothing to tune
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold),
        (M_TOP_PAD, top_pad)))
    _done = ok
    if not ok:
        log.warning("mallopt refused the heap settings; steps may page-fault on fresh memory")
    return ok


def return_free_memory() -> bool:
    """Give the heap's free pages back to the system (malloc_trim): once, after a large free
    such as StageRunner.release_module_weights, not per step. False where it is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False
