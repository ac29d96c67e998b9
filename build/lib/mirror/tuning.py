"""Process-wide tuning that `mirror serve` applies before the server starts.

glibc adapts its mmap threshold upwards as large buffers are freed, after which every
fresh 1 MiB body buffer comes from the heap top and is page-faulted in 4 KiB at a time
(measured: one minor fault per page received, ~0.8 s of kernel time per GB, halving
upstream download throughput under uvloop; bench/transport.py --mallopt). Fixed
thresholds stop that. `mallopt` does at run time what the MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ environment variables do at exec time, so users need not know.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: buffers above it are mmapped
TRIM_THRESHOLD = 256 << 20  # keep freed heap memory up to this, instead of returning it


def tune_malloc() -> bool:
    """Pin glibc's malloc thresholds. Returns whether they were applied.

    Environment variables set by the operator win; non-glibc systems are left alone.
    """
    if not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    applied: bool = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    applied = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and applied
    log.debug("malloc thresholds pinned: %s", applied)
    return applied
