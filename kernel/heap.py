"""The kernel process's heap policy: big buffers go back to the OS when freed, and the garbage of big
requests is collected soon.

glibc raises its mmap threshold after a big buffer is freed (up to 32 MiB), so later frames of
a few MiB come from the heap, which rarely shrinks: a client sending big frames would grow the
kernel's RSS for good. A fixed threshold keeps every buffer of 1 MiB or more in its own mapping,
returned on free. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc

M_MMAP_THRESHOLD = -3  # glibc malloc.h
BIG_BUFFER_BYTES = 1 << 20
BIG_REQUEST_BYTES = 256 << 10  # a request frame this big may leave garbage worth a collection


def return_big_buffers_to_the_os(threshold: int = BIG_BUFFER_BYTES) -> bool:
    """Fix malloc's mmap threshold at ``threshold`` bytes; True when the C library took it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
    except (OSError, AttributeError):
        return False


class CycleCollector:
    """Runs the cyclic garbage collector once big requests stop coming for ``delay`` seconds (and at least
    every ``most`` seconds while they keep coming).

    A failed request can leave a reference cycle (a future holding its exception, whose traceback
    holds the frame that holds the future) that keeps the request's data alive: a million-id prompt
    is ~16 MB of Python objects. The collector's oldest generation runs rarely in a kernel that
    allocates little, so without this such garbage accumulated (RSS +87 MB per five such requests).
    The kernel freezes its start-up objects (``gc.freeze``), so a collection walks only what came since.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float = 0.25, most: float = 2.0) -> None:
        self.loop = loop
        self.delay, self.most = delay, most
        self._first = self._last = 0.0  # loop times of the first and the last big request not yet collected
        self._pending = False
        self.runs = 0

    def big_request(self) -> None:
        now = self.loop.time()
        self._last = now
        if not self._pending:
            self._pending, self._first = True, now
            self.loop.call_later(self.delay, self._due)

    def _due(self) -> None:
        now = self.loop.time()
        quiet_for = now - self._last
        if quiet_for < self.delay and now - self._first < self.most:
            self.loop.call_later(self.delay - quiet_for, self._due)
            return
        self._pending = False
        gc.collect()
        self.runs += 1
