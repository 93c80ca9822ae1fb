"""One model instance as the ProcessManager sees it: its run queue, batch, parked and placed processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmos.drivers.model import protocol as wp
from llmos.kernel.scheduler import Capacity, RunQueue


@dataclass
class Instance:
    """One model instance as the ProcessManager sees it; only the ProcessManager reads or writes it.

    Invariants (tested): a pid is in ``queue`` only while READY, in ``running`` only while RUNNING,
    in ``parked`` only while BLOCKED or STOPPED with its sequence in the engine; ``placed`` holds every
    live pid placed here. ``ref`` is only ever told messages.
    """

    id: str
    ref: Any
    info: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)
    queue: RunQueue = field(default_factory=RunQueue)
    running: set[int] = field(default_factory=set)
    parked: set[int] = field(default_factory=set)
    placed: set[int] = field(default_factory=set)
    dead: bool = False

    @property
    def block_size(self) -> int:
        return int(self.info.get("kv_block_size") or wp.BLOCK_SIZE)

    def capacity(self, user_caps: dict[str, int] | None) -> Capacity:
        s, i = self.stats, self.info
        total = int(s.get("kv_total") or i.get("kv_blocks") or 0)
        swap_total = int(s.get("swap_total") or i.get("swap_blocks") or 0)
        return Capacity(max_batch=int(i.get("max_batch") or 16), kv_total=total, block_size=self.block_size,
                        swap_free=max(0, swap_total - int(s.get("swap_used") or 0)),
                        kv_bytes_per_token=int(i.get("kv_bytes_per_token") or 0),
                        swap_bytes_per_s=float(i.get("swap_bytes_per_s") or 0.0),
                        prefill_tokens_per_s=float(s.get("prefill_tokens_per_s") or i.get("prefill_tokens_per_s")
                                                   or 0.0),
                        user_kv_cap=user_caps, kv_used=int(s.get("kv_used") or 0))


def context_len(info: dict) -> int | None:
    """The model's context length from an instance's ``info`` (None when the worker did not say)."""
    return int(info["context_len"]) if info.get("context_len") else None
