"""What the ProcessManager keeps about finished processes, and how records are fitted into one reply frame."""

from __future__ import annotations

import bisect

import msgpack

from llmos.syscalls import protocol


# Histogram bucket upper bounds, seconds (Prometheus style: cumulative counts, +Inf implied); chosen for CPU and
# GPU serving alike, as vLLM's and TGI's exporters do
BUCKETS: dict[str, tuple[float, ...]] = {
    "queue_time_s": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    "ttft_s": (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    "tpot_s": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5),
    "total_time_s": (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0),
}
SCHED_COUNTERS = ("preemptions", "swaps_out", "swaps_in", "recomputed_tokens", "prefill_tokens")


class Totals:
    """One model's counts since the kernel started, over its finished processes: processes by finish reason,
    tokens in and out, scheduling events, and a histogram of each timing in BUCKETS (counts per bucket, not
    cumulative; sum; count). Memory is bounded by the buckets, whatever the number of processes."""

    def __init__(self) -> None:
        self.reasons: dict[str, int] = {}
        self.tokens_in = self.tokens_out = 0
        self.sched = dict.fromkeys(SCHED_COUNTERS, 0)
        self.hist = {k: {"counts": [0] * (len(b) + 1), "sum": 0.0, "count": 0} for k, b in BUCKETS.items()}

    def add(self, stats: dict, reason: str, sched: dict) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.tokens_in += stats["prompt_tokens"]
        self.tokens_out += stats["output_tokens"]
        for k in SCHED_COUNTERS:
            self.sched[k] += int(sched.get(k) or 0)
        for key, bounds in BUCKETS.items():
            value = stats.get(key)
            if value is None:
                continue
            h = self.hist[key]
            h["counts"][bisect.bisect_left(bounds, value)] += 1
            h["sum"] += value
            h["count"] += 1

    def to_wire(self) -> dict:
        return {"finish_reasons": dict(self.reasons), "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                **self.sched, "histograms": {k: {"buckets": list(BUCKETS[k]), **v} for k, v in self.hist.items()}}


class FinishedStats:
    """Timings of the last N finished processes, for the metrics syscall (bounded memory), and each model's
    Totals since the kernel started (the Prometheus exporter's counters and histograms: kernel/prometheus.py)."""

    KEYS = ("queue_time_s", "ttft_s", "tpot_s", "total_time_s")

    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self.rows: list[dict] = []
        self.count = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.reasons: dict[str, int] = {}
        self.models: dict[str, Totals] = {}

    def add(self, stats: dict, reason: str, model: str = "", sched: dict | None = None) -> None:
        self.count += 1
        self.tokens_in += stats["prompt_tokens"]
        self.tokens_out += stats["output_tokens"]
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.models.setdefault(model, Totals()).add(stats, reason, sched or {})
        self.rows.append(stats)
        if len(self.rows) > self.keep:
            del self.rows[: len(self.rows) - self.keep]

    def totals(self) -> dict[str, dict]:
        """Each model's Totals, on the wire."""
        return {model: t.to_wire() for model, t in self.models.items()}

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
