"""The C allocator's settings for a CPU engine: freed memory is kept for the next step, not
returned to the kernel and faulted back in.

glibc serves an allocation above its mmap threshold (128 KiB at first, raised as such blocks are
freed) with a fresh mapping, and gives the top of a heap back to the kernel once more than twice
that is free there. A CPU engine step allocates and frees the same few-MiB tensors again and again
(a prefill's attention scores: 65 queries x 3 heads x 2,000 keys x 4 bytes = 1.5 MiB per KV head,
every layer), so each one came back as fresh pages: about 20,000 page faults per step on a
2,000-token history, which made the attention of a 65-token turn on it 41 ms instead of 20 ms
(12 layers, 2 cores). vLLM's CPU guide preloads tcmalloc for the same reason; this keeps to the
allocator the process already has.

    M_MMAP_THRESHOLD 32 MiB   blocks below it come from the heaps and go back to them
    M_TRIM_THRESHOLD 256 MiB  free memory a heap keeps at its top before trimming

At most 256 MiB per heap stays with the process after a burst: small beside the model and the KV
pool. Other C libraries (musl) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 256 << 20

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; True where the C library took them (glibc)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or not glibc
        log.debug("mallopt unavailable; the C allocator keeps its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    return _applied
