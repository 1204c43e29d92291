"""Large allocations straight from the OS while merging: glibc's mmap threshold held fixed.

glibc serves an allocation of at least M_MMAP_THRESHOLD bytes with its own mmap and unmaps it when
freed, but raises the threshold to the size of every such block freed (up to 32 MiB on 64-bit), so
that the next blocks of that size come from its heap instead, where freed blocks fragment it and
are not given back. A merge that streams a tensor in row blocks of a few MiB allocates and frees
the same sizes thousands of times: measured on SmolLM2's shapes, task_arithmetic in 11 MiB blocks
peaked at 284 MiB of anonymous memory with the dynamic threshold and 199 MiB with it fixed (whole
tensors over 32 MiB, RegMean's and average's, are always mmapped). Results do not depend on it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, <malloc.h>
THRESHOLD = 128 * 2**10  # glibc's default


def fix_mmap_threshold(size: int = THRESHOLD) -> bool:
    """Every allocation of `size` bytes or more mmapped and unmapped when freed, for the rest of the
    process; False (and nothing changed) where the C library has no `mallopt` (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False
