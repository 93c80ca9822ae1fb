"""The kernel process's heap policy: big buffers go back to the OS when freed.

glibc raises its mmap threshold after a big buffer is freed (up to 32 MiB), so later frames of
a few MiB come from the heap, which rarely shrinks: a client sending big frames would grow the
kernel's RSS for good. A fixed threshold keeps every buffer of 1 MiB or more in its own mapping,
returned on free. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc malloc.h
BIG_BUFFER_BYTES = 1 << 20


def return_big_buffers_to_the_os(threshold: int = BIG_BUFFER_BYTES) -> bool:
    """Fix malloc's mmap threshold at ``threshold`` bytes; True when the C library took it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        return False
