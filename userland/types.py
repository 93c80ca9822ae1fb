"""What the client returns: process results, records and stats, built from reply maps."""

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
    """A finished process: its text, token ids, why it ended, and its stats."""

    pid: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: Stats
    state: str = "ZOMBIE"
    error: dict[str, Any] | None = None
    signal: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the kernel changed about the request

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "ProcessResult":
        d = dict(d)
        d["stats"] = Stats(**_pick(Stats, d.get("stats") or {}))
        return cls(**_pick(cls, d))


@dataclass(frozen=True)
class ProcessInfo:
    """One row of ``ps``."""

    pid: int
    state: str
    priority: int
    model: str
    owner: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    created: float = 0.0
    finish_reason: str | None = None
    text: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "ProcessInfo":
        return cls(**_pick(cls, d))
