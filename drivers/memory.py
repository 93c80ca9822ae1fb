"""The memory driver: KV-cache block pools (the LLM's page frames) with per-process and per-user accounting.

A pool hands out fixed-size blocks of token slots. Every process has a block table (its
page table: the list of blocks holding its context, in order). The pool admits an
allocation only when the blocks are there and the user's cap allows it, and takes every
block back when a process ends. It is pure bookkeeping: the tensors that the blocks index
live in the engine.

Prefix caching (issue 13): a full block whose keys and values an engine has computed can be
*registered* under the hash chain of the tokens up to its end (:func:`chain_hashes`); another
process whose tokens start the same way *attaches* it to its own table instead of computing it
again. Blocks are reference-counted: a block is in as many tables as hold it. A registered block
no table holds any more stays cached, in an LRU list: it counts as free (``free_blocks``,
``can_allocate``) and is evicted (dropped from the index, its slots reused) least-recently-used
first, only when an allocation finds no never-cached block left. A block another table or the
index holds is never written: :meth:`KVBlockPool.make_private` gives a table a private copy first
(copy-on-write; the engine copies the slots).

Accounting of a shared block: ``usage().used`` counts distinct blocks held by some table (cached
blocks no table holds are ``free``). Per user (``used_by``, the isolated policy's caps) and per
process, each holder is charged its whole table, shared blocks included: a user's charge never
falls below the distinct blocks its processes hold, so a cap bounds what a user can pin, and a
user's charge does not change when another user's process ends.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from llmos.drivers.model.protocol import PAD_BLOCK, blocks_for
from llmos.syscalls.errors import OutOfMemory

__all__ = ["KVBlockPool", "PoolUsage", "blocks_for", "chain_hashes"]  # blocks_for is protocol's, re-exported


HASH_BYTES = 16  # 128-bit block keys: a collision would hand one prompt another's KV, so not Python's 64-bit hash()


def chain_hashes(tokens: list[int], block_size: int, have: list[bytes], salt: bytes = b"") -> list[bytes]:
    """Extend ``have`` (the keys of the first ``len(have)`` full blocks of ``tokens``) to every full block.

    Key i is blake2b(key i-1 || tokens of block i), key -1 being ``salt`` (the isolated policy salts with the
    user, so users never share blocks): a key names the whole prefix up to its block's end, not the block
    alone. Tokens are int32 (a vocabulary under 2**31). Returns ``have`` itself, extended in place."""
    for i in range(len(have), len(tokens) // block_size):
        h = hashlib.blake2b(have[-1] if have else salt, digest_size=HASH_BYTES)
        h.update(array("i", tokens[i * block_size:(i + 1) * block_size]).tobytes())
        have.append(h.digest())
    return have


@dataclass
class PoolUsage:
    block_size: int
    total: int
    used: int
    free: int
    per_user: dict[str, int]
    per_process: dict[int, int]
    cached: int = 0  # of ``free``: registered blocks no table holds, kept for a later prefix hit

    def to_wire(self) -> dict:
        return {"block_size": self.block_size, "total": self.total, "used": self.used, "free": self.free,
                "cached": self.cached, "per_user": dict(self.per_user),
                "per_process": {str(k): v for k, v in self.per_process.items()}}


class KVBlockPool:
    """Blocks 0..num_blocks-1 but ``PAD_BLOCK`` are allocatable; ``PAD_BLOCK`` is kept zeroed to pad block tables.

    Invariants (``check()``): every block but PAD_BLOCK is in exactly one of: the never-cached free stack, the
    cached LRU (indexed, in no table), held (reference count = the tables that list it, >= 1); the index maps
    keys to held or cached blocks, one key per block; each user's charge is the sum of its processes' table
    lengths."""

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
        self._refs: dict[int, int] = {}  # held block -> tables listing it
        self._index: dict[bytes, int] = {}  # prefix key -> block holding that prefix's last block of KV
        self._key_of: dict[int, bytes] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # indexed blocks no table holds, oldest first
        self.evictions = 0  # cached blocks reused for other contents

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take: never-cached ones and cached ones no table holds."""
        return len(self._free) + len(self._cached)

    @property
    def cached_blocks(self) -> int:
        """Registered blocks no table holds, kept for a later prefix hit (counted in ``free_blocks``)."""
        return len(self._cached)

    @property
    def indexed_blocks(self) -> int:
        """Blocks in the prefix index, held or cached."""
        return len(self._index)

    def can_allocate(self, n: int, user: str = "") -> bool:
        if n > self.free_blocks:
            return False
        cap = self.cap_of(user)
        return cap is None or self._per_user[user] + n <= cap

    def used_by(self, user: str) -> int:
        """Blocks ``user``'s processes hold, each process charged its whole table (shared blocks included)."""
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
        """Shrink (or grow) an empty pool to ``num_blocks``; the prefix index is dropped (the slots go)."""
        if self.tables:
            raise RuntimeError("only an empty pool can be reset")
        self.num_blocks = num_blocks
        self._free = _free_stack(num_blocks)
        self._index.clear()
        self._key_of.clear()
        self._cached.clear()

    def _take(self) -> int:
        """One block for new contents: a never-cached one, else the least recently used cached one."""
        if self._free:
            return self._free.pop()
        block, _ = self._cached.popitem(last=False)
        del self._index[self._key_of.pop(block)]
        self.evictions += 1
        return block

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each block, in reverse (the tail of a context is evicted before its head)."""
        for b in reversed(blocks):
            left = self._refs[b] - 1
            if left:
                self._refs[b] = left
                continue
            del self._refs[b]
            if b in self._key_of:
                self._cached[b] = None
            else:
                self._free.append(b)

    def allocate(self, pid: int, n: int, user: str = "") -> list[int]:
        """Append ``n`` blocks to ``pid``'s table; OutOfMemory if the pool or the user's cap is short."""
        if n <= 0:
            return []
        if n > self.free_blocks:
            raise OutOfMemory(f"KV pool has {self.free_blocks} free blocks, {n} needed")
        cap = self.cap_of(user)
        if cap is not None and self._per_user[user] + n > cap:
            raise OutOfMemory(f"user {user} would hold {self._per_user[user] + n} KV blocks, cap is {cap}")
        got = [self._take() for _ in range(n)]
        for b in got:
            self._refs[b] = 1
        self.tables.setdefault(pid, []).extend(got)
        self._owner[pid] = user
        self._per_user[user] += n
        return got

    def ensure(self, pid: int, tokens: int, user: str = "") -> list[int]:
        """Grow ``pid``'s table to hold ``tokens`` slots; return the new blocks."""
        have = len(self.tables.get(pid, ()))
        return self.allocate(pid, blocks_for(tokens, self.block_size) - have, user)

    # -- prefix caching ---------------------------------------------------------------------------
    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest run of ``keys`` (a context's chain, from its first block) in the index."""
        found = []
        for key in keys:
            b = self._index.get(key)
            if b is None:
                break
            found.append(b)
        return found

    def attach(self, pid: int, blocks: list[int], user: str = "") -> int:
        """Start ``pid``'s (empty) table with indexed ``blocks`` (from :meth:`lookup`), as many of them as the
        user's cap allows; returns how many. Each gains a reference; a cached one leaves the LRU list.
        RuntimeError when ``pid`` already holds blocks."""
        if self.tables.get(pid):
            raise RuntimeError(f"pid {pid} already holds blocks")
        cap = self.cap_of(user)
        if cap is not None:
            blocks = blocks[:max(0, cap - self._per_user[user])]
        if not blocks:
            return 0
        for b in blocks:
            self._refs[b] = self._refs.get(b, 0) + 1
            self._cached.pop(b, None)
        self.tables[pid] = list(blocks)
        self._owner[pid] = user
        self._per_user[user] += len(blocks)
        return len(blocks)

    def register(self, pid: int, i: int, key: bytes) -> bool:
        """Index block ``i`` of ``pid``'s table (full, its slots computed) under ``key``; False when it stays
        private (the key is another block's already, or this block has a key)."""
        b = self.tables[pid][i]
        if key in self._index or b in self._key_of:
            return self._index.get(key) == b
        self._index[key] = b
        self._key_of[b] = key
        return True

    def shared(self, block: int) -> bool:
        """True when a write to ``block`` would reach another table or the prefix index."""
        return self._refs.get(block, 0) > 1 or block in self._key_of

    def make_private(self, pid: int, i: int) -> tuple[int, int] | None:
        """Copy-on-write: replace block ``i`` of ``pid``'s table, when shared, by a fresh block; returns (old,
        new) for the engine to copy the slots (None: it was private). OutOfMemory when no block is free (the
        user's charge does not change: its table keeps its length)."""
        table = self.tables[pid]
        old = table[i]
        if not self.shared(old):
            return None
        if not self.free_blocks:
            raise OutOfMemory("KV pool has no free block for a copy-on-write")
        new = self._take()
        self._refs[new] = 1
        table[i] = new
        self._release([old])
        return old, new

    # -- giving blocks back --------------------------------------------------------------------------
    def truncate(self, pid: int, blocks: int) -> int:
        """Cut ``pid``'s table to its first ``blocks`` blocks, returning the rest to the pool; returns how many."""
        table = self.tables.get(pid)
        if table is None or len(table) <= blocks:
            return 0
        if blocks <= 0:
            return self.free(pid)
        cut = table[blocks:]
        del table[blocks:]
        self._release(cut)
        self._per_user[self._owner.get(pid, "")] -= len(cut)
        return len(cut)

    def free(self, pid: int) -> int:
        """Return all of ``pid``'s blocks to the pool (a registered one stays cached); returns how many."""
        blocks = self.tables.pop(pid, [])
        user = self._owner.pop(pid, "")
        self._release(blocks)
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
        return PoolUsage(self.block_size, self.capacity, len(self._refs), self.free_blocks, dict(self._per_user),
                         {pid: len(t) for pid, t in self.tables.items()}, len(self._cached))

    def check(self) -> None:
        """AssertionError unless the invariants in the class docstring hold (tests call it after every step)."""
        free, cached, held = set(self._free), set(self._cached), set(self._refs)
        assert len(free) == len(self._free), "a block twice on the free stack"
        assert not (free & cached or free & held or cached & held), "a block in two states"
        assert free | cached | held == set(range(self.num_blocks)) - {PAD_BLOCK}, "a block lost or PAD handed out"
        counts: dict[int, int] = defaultdict(int)
        for table in self.tables.values():
            for b in table:
                counts[b] += 1
        assert dict(counts) == self._refs, "reference counts differ from the tables"
        assert {b: k for k, b in self._index.items()} == self._key_of, "index and keys disagree"
        assert cached <= set(self._key_of), "a cached block is not indexed"
        assert set(self._key_of) <= cached | held, "an indexed block is on the free stack"
        charge: dict[str, int] = defaultdict(int)
        for pid, table in self.tables.items():
            charge[self._owner.get(pid, "")] += len(table)
        assert {u: n for u, n in charge.items() if n} == {u: n for u, n in self._per_user.items() if n}, \
            "per-user charges differ from the tables"


def _free_stack(num_blocks: int) -> list[int]:
    """Every block but the padding one, as a stack that hands out low block ids first."""
    return [b for b in range(num_blocks - 1, -1, -1) if b != PAD_BLOCK]
