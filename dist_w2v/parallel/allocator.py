"""glibc malloc's policy for a training process: freed memory is kept for the next step.

By default glibc serves every allocation above a threshold (128 KiB, raised on the fly up to
32 MiB) with its own ``mmap`` and hands it back with ``munmap`` when freed, and trims the heap's
free top above 128 KiB. A CPU step allocates tens of megabytes of temporaries (each thread's
partial gradient, the gathered rows, the sparse gradients) and a chunk build some more, so every
step maps fresh pages and takes a page fault on each first touch. Serving allocations up to
64 MiB from the heap and trimming only above 1 GiB lets each step reuse the last one's pages.

Measured on the 2-core dev machine (configs/ptb-fast.yaml, 3 epochs, two runs each, center
words/s per epoch; benchmarks/throughput.md, "Freed memory kept"): default 476k / 675k / 814k
and 505k / 660k / 688k; both settings 722k / 883k / 978k and 665k / 846k / 961k; peak RSS
639 MB vs 650 MB. Either setting alone is slower than both (a fixed trim threshold also stops
glibc raising its mmap threshold).
"""

from __future__ import annotations

import ctypes
import platform

# mallopt's parameter numbers, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 2**20
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Set the policy above for this process; False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
