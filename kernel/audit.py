"""The audit trail: refused calls and administrative actions, in the kernel log (``dmesg``) with the user.

Bounded in size and in rate: each line's fields are cut as every log line's are (kernel/log.py), and
each user may write at most BURST lines at once and RATE_PER_S lines a second after that (a token
bucket per user); what goes over is counted and said in the user's next line (``suppressed``), so
a client that hammers the kernel with refused calls cannot flood the log ring and push out
everyone else's lines. The rate is per user and for all users together (GLOBAL_PER_S).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from llmos.kernel.log import Logger, get_logger

RATE_PER_S = 5.0  # audit lines a second, per user, after the burst
BURST = 20  # audit lines a user may write at once
GLOBAL_PER_S, GLOBAL_BURST = 50.0, 200  # the same, for every user together
MAX_USERS = 10_000  # users with a bucket; beyond it the fullest buckets are dropped (they refill anyway)


class _Bucket:
    __slots__ = ("tokens", "stamp", "suppressed")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens, self.stamp, self.suppressed = burst, now, 0

    def take(self, rate: float, burst: float, now: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False


class Audit:
    """``refused`` and ``admin`` write one audit line each, within the rate bounds."""

    def __init__(self, log: Logger | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log or get_logger("audit")
        self.clock = clock
        self._users: dict[str, _Bucket] = {}
        self._all: _Bucket | None = None

    def refused(self, user: str, call: str, reason: str, **fields: Any) -> bool:
        """A call refused (EPERM); True when the line was written, False when over the rate."""
        return self._write("warning", "refused", user, call=call, reason=reason, **fields)

    def admin(self, user: str, call: str, **fields: Any) -> bool:
        """An administrative action the access rule let through (its ``result``: ok, or the errno it failed
        with)."""
        return self._write("info", "admin_action", user, call=call, **fields)

    def _write(self, level: str, event: str, user: str, **fields: Any) -> bool:
        now = self.clock()
        if self._all is None:
            self._all = _Bucket(GLOBAL_BURST, now)
        bucket = self._users.get(user)
        if bucket is None:
            if len(self._users) >= MAX_USERS:
                self._users = {u: b for u, b in self._users.items() if b.tokens < BURST - 1 or b.suppressed}
            bucket = self._users[user] = _Bucket(BURST, now)
        if not bucket.take(RATE_PER_S, BURST, now):
            return False
        if not self._all.take(GLOBAL_PER_S, GLOBAL_BURST, now):
            bucket.suppressed += 1
            return False
        suppressed, bucket.suppressed = bucket.suppressed, 0
        total, self._all.suppressed = self._all.suppressed, 0
        extra = {"suppressed": suppressed} if suppressed else {}
        if total:
            extra["suppressed_all_users"] = total
        self.log.log(level, event, user=user, **fields, **extra)
        return True
