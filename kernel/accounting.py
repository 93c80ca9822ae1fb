"""What the ProcessManager keeps about finished processes, and how records are fitted into one reply frame."""

from __future__ import annotations

import msgpack

from llmos.syscalls import protocol


class FinishedStats:
    """Timings of the last N finished processes, for the metrics syscall (bounded memory)."""

    KEYS = ("queue_time_s", "ttft_s", "tpot_s", "total_time_s")

    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self.rows: list[dict] = []
        self.count = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.reasons: dict[str, int] = {}

    def add(self, stats: dict, reason: str) -> None:
        self.count += 1
        self.tokens_in += stats["prompt_tokens"]
        self.tokens_out += stats["output_tokens"]
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.rows.append(stats)
        if len(self.rows) > self.keep:
            del self.rows[: len(self.rows) - self.keep]

    def summary(self) -> dict:
        out: dict = {"count": self.count, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                     "finish_reasons": dict(self.reasons)}
        for key in self.KEYS:
            vals = sorted(r[key] for r in self.rows if r.get(key) is not None)
            if vals:
                out[key] = {"mean": sum(vals) / len(vals), "p50": vals[len(vals) // 2],
                            "p95": vals[min(len(vals) - 1, int(len(vals) * 0.95))], "max": vals[-1]}
        return out


# What a list of records in one reply may take, leaving room for the rest of the reply.
RECORDS_BUDGET_BYTES = protocol.MAX_FRAME_BYTES - (1 << 20)


def fit_records(records: list[dict], budget: int = RECORDS_BUDGET_BYTES) -> tuple[list[dict], int]:
    """The records that fit ``budget`` bytes as MessagePack, in order, and how many were left out."""
    kept: list[dict] = []
    used = omitted = 0
    for rec in records:
        size = len(msgpack.packb(rec, use_bin_type=True, default=str))
        if used + size > budget:
            omitted += 1
        else:
            kept.append(rec)
            used += size
    return kept, omitted
