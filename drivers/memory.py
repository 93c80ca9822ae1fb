"""The memory driver: KV-cache block pools (the LLM's page frames) with per-process and per-user accounting.

A pool hands out fixed-size blocks of token slots. Every process has a block table (its
page table: the list of blocks holding its context, in order). The pool admits an
allocation only when the blocks are there and the user's cap allows it, and takes every
block back when a process ends. It is pure bookkeeping: the tensors that the blocks index
live in the engine.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from llmos.drivers.model.protocol import PAD_BLOCK, blocks_for
from llmos.syscalls.errors import OutOfMemory

__all__ = ["KVBlockPool", "PoolUsage", "blocks_for"]  # blocks_for is protocol's, re-exported for old importers


@dataclass
class PoolUsage:
    block_size: int
    total: int
    used: int
    free: int
    per_user: dict[str, int]
    per_process: dict[int, int]

    def to_wire(self) -> dict:
        return {"block_size": self.block_size, "total": self.total, "used": self.used, "free": self.free,
                "per_user": dict(self.per_user), "per_process": {str(k): v for k, v in self.per_process.items()}}


class KVBlockPool:
    """Blocks 0..num_blocks-1 but ``PAD_BLOCK`` are allocatable; ``PAD_BLOCK`` is kept zeroed to pad block tables."""

    def __init__(self, num_blocks: int, block_size: int, user_caps: dict[str, int] | None = None,
                 default_user_cap: int | None = None) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("a pool needs at least 2 blocks of at least 1 slot")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.user_caps = dict(user_caps or {})
        self.default_user_cap = default_user_cap  # the isolation policy's cap for users not named
        self._free = _free_stack(num_blocks)
        self.tables: dict[int, list[int]] = {}
        self._owner: dict[int, str] = {}
        self._per_user: dict[str, int] = defaultdict(int)

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int, user: str = "") -> bool:
        if n > len(self._free):
            return False
        cap = self.cap_of(user)
        return cap is None or self._per_user[user] + n <= cap

    def used_by(self, user: str) -> int:
        """Blocks ``user``'s processes hold."""
        return self._per_user.get(user, 0)

    def cap_of(self, user: str) -> int | None:
        return self.user_caps.get(user, self.default_user_cap)

    def grow(self, num_blocks: int) -> None:
        """Add blocks num_blocks..new-1 to the free list (the engine grows its tensors to match)."""
        if num_blocks <= self.num_blocks:
            return
        self._free[:0] = [b for b in range(num_blocks - 1, self.num_blocks - 1, -1) if b != PAD_BLOCK]
        self.num_blocks = num_blocks

    def reset(self, num_blocks: int) -> None:
        """Shrink (or grow) an empty pool to ``num_blocks``."""
        if self.tables:
            raise RuntimeError("only an empty pool can be reset")
        self.num_blocks = num_blocks
        self._free = _free_stack(num_blocks)

    def allocate(self, pid: int, n: int, user: str = "") -> list[int]:
        """Append ``n`` blocks to ``pid``'s table; OutOfMemory if the pool or the user's cap is short."""
        if n <= 0:
            return []
        if n > len(self._free):
            raise OutOfMemory(f"KV pool has {len(self._free)} free blocks, {n} needed")
        cap = self.cap_of(user)
        if cap is not None and self._per_user[user] + n > cap:
            raise OutOfMemory(f"user {user} would hold {self._per_user[user] + n} KV blocks, cap is {cap}")
        got = [self._free.pop() for _ in range(n)]
        self.tables.setdefault(pid, []).extend(got)
        self._owner[pid] = user
        self._per_user[user] += n
        return got

    def ensure(self, pid: int, tokens: int, user: str = "") -> list[int]:
        """Grow ``pid``'s table to hold ``tokens`` slots; return the new blocks."""
        have = len(self.tables.get(pid, ()))
        return self.allocate(pid, blocks_for(tokens, self.block_size) - have, user)

    def truncate(self, pid: int, blocks: int) -> int:
        """Cut ``pid``'s table to its first ``blocks`` blocks, returning the rest to the pool; returns how many."""
        table = self.tables.get(pid)
        if table is None or len(table) <= blocks:
            return 0
        if blocks <= 0:
            return self.free(pid)
        cut = table[blocks:]
        del table[blocks:]
        self._free.extend(reversed(cut))
        self._per_user[self._owner.get(pid, "")] -= len(cut)
        return len(cut)

    def free(self, pid: int) -> int:
        """Return all of ``pid``'s blocks to the pool; returns how many."""
        blocks = self.tables.pop(pid, [])
        user = self._owner.pop(pid, "")
        self._free.extend(reversed(blocks))
        if blocks:
            self._per_user[user] -= len(blocks)
            if self._per_user[user] == 0:
                del self._per_user[user]
        return len(blocks)

    def inventory(self) -> dict:
        """The device-interface view of the pool: what it is and how big."""
        return {"kind": "kv_pool", "block_size": self.block_size, "blocks": self.capacity,
                "user_caps": dict(self.user_caps), "default_user_cap": self.default_user_cap}

    def usage(self) -> PoolUsage:
        used = self.capacity - len(self._free)
        return PoolUsage(self.block_size, self.capacity, used, len(self._free), dict(self._per_user),
                         {pid: len(t) for pid, t in self.tables.items()})


def _free_stack(num_blocks: int) -> list[int]:
    """Every block but the padding one, as a stack that hands out low block ids first."""
    return [b for b in range(num_blocks - 1, -1, -1) if b != PAD_BLOCK]
