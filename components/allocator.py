"""Process-wide tuning of glibc's malloc for training with large activation tensors.

A CQL update allocates and frees activation buffers of 8-16 MB (B(3N+1) rows of 256 floats, per
critic or for both) several times per step. glibc serves requests above its mmap threshold with a fresh
`mmap` and returns them with `munmap` on free, and it hands freed memory at the top of the heap
back to the kernel once more than the trim threshold is free. Either way the next step touches
new pages: every 4 KiB page of every buffer page-faults and is zeroed by the kernel, each step.

`keep_freed_memory()` raises both thresholds so that these buffers come from the heap and stay
mapped for reuse. The cost: memory freed by the process is not returned to the OS, so the
resident size stays at its peak. Opt out with `CQLSAC_MALLOC_TUNING=0` in the environment (or
simply do not call it). It does nothing where the C library has no `mallopt` (musl, macOS,
Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc caps the mmap threshold at 32 MiB on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024

ENV_SWITCH = "CQLSAC_MALLOC_TUNING"


def keep_freed_memory() -> bool:
    """Let glibc malloc serve buffers up to 32 MiB from the heap and keep freed memory mapped.

    Call once at start-up, before the training loop. Returns True when the settings were
    applied, False when opted out (`CQLSAC_MALLOC_TUNING=0`) or when `mallopt` is unavailable.
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. Fixing the mmap threshold also turns off glibc's dynamic
    # threshold, which would otherwise move with the sizes freed so far.
    mmap_set = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    trim_set = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return mmap_set and trim_set
