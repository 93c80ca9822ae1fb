"""What the client returns: process results, records, session turns and stats, built from reply maps."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _pick(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class Stats:
    """Timings and counts of one process; times in seconds, None when not reached."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    max_new_tokens: int | None = None  # the output limit that applied: as asked, or cut to the context
    queue_time_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    total_time_s: float | None = None


@dataclass(frozen=True)
class ProcessResult:
    """A finished process: its text, token ids, why it ended, and its stats.

    ``sched`` holds the scheduler's counters: preemptions, swaps_out, swaps_in, recomputed_tokens,
    prefill_tokens, turns and time_in_state (seconds per state); empty from a kernel that sends none.
    """

    pid: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: Stats
    state: str = "ZOMBIE"
    error: dict[str, Any] | None = None
    signal: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the kernel changed about the request
    sched: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "ProcessResult":
        d = dict(d)
        d["stats"] = Stats(**_pick(Stats, d.get("stats") or {}))
        d["sched"] = d.get("sched") or {}
        return cls(**_pick(cls, d))


@dataclass(frozen=True)
class TurnStats:
    """One session turn's costs: tokens it prefilled (its new tokens, plus any recomputation), the context
    after it, the reply's tokens; times in seconds, None when not reached."""

    prefill_tokens: int = 0
    context_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    total_time_s: float | None = None


@dataclass(frozen=True)
class TurnResult:
    """A session's reply to one ``write``: its text, token ids, why it ended, and the turn's stats.

    ``state`` is BLOCKED when the session waits for its next turn, ZOMBIE when the turn ended it
    (a deadline, a signal, an error: ``error`` then holds {errno, error, message}).
    """

    pid: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: TurnStats
    state: str = "BLOCKED"
    error: dict[str, Any] | None = None

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "TurnResult":
        d = dict(d)
        d["stats"] = TurnStats(**_pick(TurnStats, d.get("stats") or {}))
        return cls(**_pick(cls, d))


@dataclass(frozen=True)
class ProcessInfo:
    """One row of ``ps`` (and ``stat``, which adds ``text``, ``stats`` and ``sched``).

    ``priority`` is the nice value (-20..19, lower runs first); ``kv_blocks`` the KV blocks its context
    holds on the device now (0 when swapped out or not started); ``session`` marks a process that stays
    alive between turns.
    """

    pid: int
    state: str
    priority: int
    model: str
    owner: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    created: float = 0.0
    finish_reason: str | None = None
    session: bool = False
    kv_blocks: int = 0
    preemptions: int = 0
    text: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    sched: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "ProcessInfo":
        d = dict(d)
        for name in ("stats", "sched"):
            d[name] = d.get(name) or {}
        for name in ("kv_blocks", "preemptions"):
            d[name] = d.get(name) or 0
        d["session"] = bool(d.get("session"))
        return cls(**_pick(cls, d))
