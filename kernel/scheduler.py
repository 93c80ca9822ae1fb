"""Run queues: READY processes ordered by nice value (lower first), then by arrival.

The policy is pure and synchronous so tests drive it step by step without a loop or sockets.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable


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

    def peek(self) -> int | None:
        while self._heap and self._heap[0][2] not in self._live:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

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


def admit(queue: RunQueue, free_slots: int, fits: Callable[[int], bool] = lambda pid: True) -> list[int]:
    """Pop up to ``free_slots`` pids to run next, best first, while ``fits(pid)`` says its memory is there.

    The head of the queue that does not fit stops admission: a smaller process behind it must
    not overtake it forever (no starvation of long prompts).
    """
    out: list[int] = []
    while len(out) < free_slots:
        pid = queue.peek()
        if pid is None or not fits(pid):
            break
        out.append(queue.pop())
    return out
