"""Per-user limits (cgroup-like) and per-process timers: pure bookkeeping with time passed in.

``Quotas`` answers whether a user may start more work: live processes (EAGAIN), tokens per
minute over a sliding window (EDQUOT, with when to retry), KV blocks one process would need
(EDQUOT: it can never fit the user's cap). The KV blocks a user holds are enforced by the
scheduler (``kernel/scheduler.py``: a process over its user's cap waits). ``Timers`` is a heap
of deadlines, one live entry per (pid, kind).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from llmos.syscalls.errors import QuotaExceeded, TryAgain

WINDOW_S = 60.0  # the tokens-per-minute window


@dataclass(frozen=True)
class UserLimits:
    """One user's limits; None means unlimited."""

    max_procs: int | None = None  # live (not ZOMBIE) processes
    max_kv_blocks: int | None = None  # KV blocks on the device at once, over all models
    tokens_per_minute: int | None = None  # prompt and output tokens over the last minute, checked when a request
    # (a spawn, a session's turn) starts: a request under way is not cut


@dataclass
class Quotas:
    """The limits of every user (``default`` for users not named) and their token use."""

    default: UserLimits = field(default_factory=UserLimits)
    users: dict[str, UserLimits] = field(default_factory=dict)
    _tokens: dict[str, deque] = field(default_factory=dict)  # user -> (time, tokens) in the window

    def of(self, user: str) -> UserLimits:
        return self.users.get(user, self.default)

    def use_tokens(self, user: str, n: int, now: float) -> None:
        if n > 0 and self.of(user).tokens_per_minute is not None:
            self._tokens.setdefault(user, deque()).append((now, n))

    def tokens_used(self, user: str, now: float) -> int:
        q = self._tokens.get(user)
        if not q:
            return 0
        while q and q[0][0] <= now - WINDOW_S:
            q.popleft()
        return sum(n for _, n in q)

    def check_start(self, user: str, live: int, tokens: int, blocks: int, now: float) -> None:
        """Raise TryAgain (EAGAIN) or QuotaExceeded (EDQUOT), naming the limit and when to retry, when
        ``user`` (with ``live`` live processes) may not start work of ``tokens`` prompt tokens needing
        ``blocks`` KV blocks."""
        lim = self.of(user)
        if lim.max_procs == 0:
            raise QuotaExceeded(f"user {user} may not run processes (its limit is 0 live processes)")
        if lim.tokens_per_minute == 0 and tokens > 0:
            raise QuotaExceeded(f"user {user} may not use tokens (its limit is 0 tokens per minute)")
        if lim.max_procs is not None and live >= lim.max_procs:
            raise TryAgain(f"user {user} has {live} live processes, the limit is {lim.max_procs}: retry once "
                           "one of them has ended (wait for it, or kill one)")
        if lim.max_kv_blocks is not None and blocks > lim.max_kv_blocks:
            raise QuotaExceeded(f"this prompt needs {blocks} KV blocks and user {user} may hold at most "
                                f"{lim.max_kv_blocks}: it can never run under that quota; shorten it")
        if lim.tokens_per_minute is not None:
            used = self.tokens_used(user, now)
            if used + tokens > lim.tokens_per_minute:
                retry = self._retry_after(user, used + tokens - lim.tokens_per_minute, now)
                raise QuotaExceeded(f"user {user} used {used} tokens in the last minute and this request adds "
                                    f"{tokens}; the limit is {lim.tokens_per_minute} tokens per minute: retry "
                                    f"in {retry:.1f} s")

    def _retry_after(self, user: str, excess: int, now: float) -> float:
        """Seconds until ``excess`` tokens have left the window (the window's length when they never will)."""
        freed = 0
        for at, n in self._tokens.get(user, ()):
            freed += n
            if freed >= excess:
                return max(0.0, at + WINDOW_S - now)
        return WINDOW_S


class Timers:
    """Deadlines: ``arm(pid, kind, at)`` replaces that pid's timer of that kind; ``due(now)`` pops the expired."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._at: dict[tuple[int, str], float] = {}

    def arm(self, pid: int, kind: str, at: float) -> None:
        self._at[(pid, kind)] = at
        heapq.heappush(self._heap, (at, pid, kind))

    def cancel(self, pid: int, kind: str | None = None) -> None:
        for k in ([kind] if kind else [k for (p, k) in self._at if p == pid]):
            self._at.pop((pid, k), None)

    def next_at(self) -> float | None:
        while self._heap and self._at.get(self._heap[0][1:]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[tuple[int, str]]:
        out = []
        while (at := self.next_at()) is not None and at <= now:
            _, pid, kind = heapq.heappop(self._heap)
            del self._at[(pid, kind)]
            out.append((pid, kind))
        return out
