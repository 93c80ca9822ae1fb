"""Zombie retention: which finished processes nobody waited for the kernel reaps, and when.

Pure policy: plain records in, pids out, time passed in (tests drive it with a fake clock). A
ZOMBIE is reaped once it has been one for ``ttl_s`` seconds, and beyond ``max_per_owner``
ZOMBIEs of one owner the oldest are reaped at once. A ZOMBIE that is ``held`` (a ``wait`` or a
``stream`` on it is still in flight) is never reaped; it still counts towards its owner's cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Zombie:
    pid: int
    owner: str
    finished_at: float  # seconds, on the clock ``now`` is read from
    held: bool = False


def to_reap(zombies: Iterable[Zombie], now: float, ttl_s: float, max_per_owner: int) -> list[int]:
    """The pids to reap now, oldest first. ``max_per_owner`` 0 keeps no unheld ZOMBIE at all."""
    reap: list[Zombie] = []
    by_owner: dict[str, list[Zombie]] = {}
    for z in sorted(zombies, key=lambda z: (z.finished_at, z.pid)):
        if not z.held and now - z.finished_at >= ttl_s:
            reap.append(z)
        else:
            by_owner.setdefault(z.owner, []).append(z)
    for kept in by_owner.values():
        excess = len(kept) - max_per_owner
        for z in kept:
            if excess <= 0:
                break
            if not z.held:
                reap.append(z)
                excess -= 1
    reap.sort(key=lambda z: (z.finished_at, z.pid))
    return [z.pid for z in reap]
