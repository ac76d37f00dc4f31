"""How much freed memory the C allocator keeps (perf.mmap_threshold_kb).

PyTorch's CPU tensors come from malloc. glibc serves blocks above its mmap threshold with a mapping of their
own, returned to the OS on free, and everything smaller from its heaps, which keep freed memory for reuse.
The threshold starts at 128 KiB but rises to the size of every mapped block that is freed (up to 32 MiB), so
after the first training step most activation tensors live in the heaps: the freed ones are not reused well
for tensors of other shapes and peak RSS climbs. Fixing the threshold stops that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MAX_THRESHOLD_KB = 32 * 1024  # glibc refuses more than HEAP_MAX_SIZE / 2 on 64-bit


def set_mmap_threshold(kb: int) -> bool:
    """Fix glibc's mmap threshold at `kb` KiB for this process (which also turns off its dynamic raising).
    Returns False where there is no glibc mallopt (macOS, musl) or it refused; the run goes on unchanged."""
    if kb <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, min(kb, MAX_THRESHOLD_KB) * 1024))
