"""Process-wide memory-allocator tuning for the command line.

A forward of MambaIRv2-light at 64x64 allocates and frees ~200 MB of short-lived tensors, most
of them above glibc's mmap threshold. glibc hands such blocks back to the kernel on free, so
the next one is mapped and zero-filled again: ~50,000 page faults per forward, 0.1-0.2 s of
kernel time (measured with getrusage). Raising the mmap and trim thresholds keeps freed blocks
in the heap for the next tensor of the same size. PyTorch's CPU tuning guide gets the same
effect by preloading jemalloc or tcmalloc; this needs no extra library.

A library should not change its host's allocator, so only the CLI calls this (and the
benchmark tools, on both sides of a comparison). ``QMAMBA_DEPLOY_MALLOC=default`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks below this come from the heap and are reused (glibc's maximum is 32 MiB on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory kept at the top of the heap before it is given back
TRIM_THRESHOLD = 256 << 20
#: the same settings as environment variables, for a child process (glibc reads them at start)
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap/trim thresholds in this process; False where that does not apply
    (not Linux with glibc, or turned off by QMAMBA_DEPLOY_MALLOC=default)."""
    if os.environ.get("QMAMBA_DEPLOY_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
