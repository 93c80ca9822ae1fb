"""Run queues: READY processes ordered by nice value (lower first), then by arrival.

The policy is pure and synchronous so tests drive it step by step without a loop or sockets.
"""

from __future__ import annotations

import heapq
import itertools


class RunQueue:
    """A priority queue of pids keyed by (priority, arrival). Removal is lazy and O(1)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int]] = []
        self._live: set[int] = set()
        self._seq = itertools.count()

    def push(self, pid: int, priority: int) -> None:
        if pid in self._live:
            raise ValueError(f"pid {pid} already queued")
        heapq.heappush(self._heap, (priority, next(self._seq), pid))
        self._live.add(pid)

    def pop(self) -> int | None:
        while self._heap:
            _, _, pid = heapq.heappop(self._heap)
            if pid in self._live:
                self._live.discard(pid)
                return pid
        return None

    def remove(self, pid: int) -> bool:
        if pid in self._live:
            self._live.discard(pid)
            return True
        return False

    def __contains__(self, pid: int) -> bool:
        return pid in self._live

    def __len__(self) -> int:
        return len(self._live)

    def order(self) -> list[int]:
        """The pids in the order they would be popped (for ps and tests)."""
        return [pid for _, _, pid in sorted(self._heap) if pid in self._live]


def admit(queue: RunQueue, free_slots: int) -> list[int]:
    """Pop up to ``free_slots`` pids to run next, best first."""
    out: list[int] = []
    while len(out) < free_slots:
        pid = queue.pop()
        if pid is None:
            break
        out.append(pid)
    return out
