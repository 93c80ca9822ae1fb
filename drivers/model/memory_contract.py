"""The memory contract every engine keeps, and the swap and spill areas' hooks (mixed into ``BaseEngine``).

A sequence that can never fit ends with ENOMEM; otherwise, while the pool (or its user's cap) is
short, idle sessions give way first (swapped out), then the last-ranked active sequence, which is
parked and reported to the kernel as a preemption event. Engines that hold KV tensors implement the
swap hooks (copy a sequence's blocks out to host memory and back); those whose KV lies in pool blocks
also the spill hooks (write a sequence's blocks to the worker's spill area on disk and read them back,
``spill.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmos.drivers.model.protocol import StepEvent, blocks_for
from llmos.syscalls.errors import Errno, OutOfMemory

if TYPE_CHECKING:
    from llmos.drivers.model.engine import Sequence


class MemoryContract:
    """The memory half of BaseEngine: block limits, room-making by preemption, pool growth and shrinking."""

    # -- the swap area: engines that hold KV tensors implement these -------------------------------
    def _swap_out(self, seq: Sequence) -> Any:
        """Copy ``seq``'s KV (its ``computed`` tokens) out of the pool into host memory; returns the handle."""
        raise NotImplementedError

    def _swap_in(self, seq: Sequence) -> None:
        """Copy ``seq.swap`` back into its (newly allocated) pool blocks."""
        raise NotImplementedError

    def _swap_truncate(self, swap: Any, blocks: int, tokens: int) -> Any:
        """The swap handle cut to its first ``blocks`` blocks (``tokens`` tokens)."""
        raise NotImplementedError

    def _spill_rows(self, seq: Sequence) -> Any:
        """``rows(lo, hi)`` for SpillArea.write: ``seq``'s pool blocks lo..hi-1 as bytes-like values of the area's
        ``block_bytes`` (engines with ``can_spill``)."""
        raise NotImplementedError

    def _spill_in(self, seq: Sequence) -> bool:
        """Read ``seq``'s spilled blocks back into its (newly allocated) pool blocks; False when they cannot be read."""
        raise NotImplementedError

    def _cache_truncate(self, seq: Sequence, tokens: int) -> None:
        """Engines with a per-sequence cache object cut it to ``tokens`` tokens."""

    # -- memory: one contract for every engine ------------------------------------------------
    def _block_limit(self, seq: Sequence) -> int:
        """The most blocks this sequence could ever hold: the pool's (largest) size, and its user's cap."""
        limit = (self.max_blocks if self.kv_policy == "dynamic" else self.pool.num_blocks) - 1
        cap = self.pool.cap_of(seq.user)
        return min(limit, cap) if cap is not None else limit

    def _never_fits(self, seq: Sequence, tokens: int) -> StepEvent | None:
        """The ENOMEM event (the sequence is dropped) when ``tokens`` need more blocks than it may ever hold."""
        limit = self._block_limit(seq)
        if blocks_for(tokens, self.pool.block_size) <= limit:
            return None
        return self._fail(seq, Errno.ENOMEM, f"{tokens} tokens need more KV blocks of {self.pool.block_size} "
                                             f"than the {limit} this sequence may ever hold")

    def _make_room(self, seq: Sequence, tokens: int, keep: set[int], active_victims: bool = True) -> StepEvent | bool:
        """Give ``seq`` blocks for ``tokens`` slots, the memory contract every engine keeps.

        A sequence that can never fit ends with ENOMEM (the event is returned). Otherwise, while the pool (or the
        user's cap) is short, a holder of blocks not in ``keep`` (already run this step) gives way: parked ones
        first (idle sessions: their KV is swapped out), then, when ``active_victims``, the active one that ranks
        last (lowest priority, then newest). The victim is parked (KV swapped out to the host area or the spill area
        if either has room, else dropped) and its event, ``preempted`` set, joins this step's events: the kernel
        resumes it later. At its user's cap only that user's sequences give way. True when ``seq`` has its blocks;
        False when it must wait (it was the one preempted, or nobody could give way).
        """
        failed = self._never_fits(seq, tokens)
        if failed is not None:
            return failed
        while not self._ensure(seq, tokens):
            capped = self._capped(seq, tokens)
            # an active victim never ranks before ``seq`` (no inversion): ``seq`` itself gives way first
            victim = max((s for s in self.seqs.values() if s.pid not in keep and self.pool.tables.get(s.pid)
                          and (s.parked or (active_victims and s.rank >= seq.rank))
                          and (not capped or s.user == seq.user)), key=lambda s: (s.parked, s.rank), default=None)
            if victim is None:
                return False
            self._force_preempt(victim)
            if victim is seq:
                return False
        return True

    def _force_preempt(self, seq: Sequence) -> None:
        """Park ``seq`` under memory pressure (swap or spill if an area has room), reporting it in this step's
        events."""
        if not seq.parked:
            seq.preemptions += 1
            self.preemptions += 1
        seq.parked = True
        self._forced.append(self._evict(seq, "swap"))

    def _capped(self, seq: Sequence, tokens: int) -> bool:
        """True when the blocks ``seq`` needs for ``tokens`` slots would take its user past the user's cap."""
        cap = self.pool.cap_of(seq.user)
        need = max(1, blocks_for(max(tokens, seq.computed), self.pool.block_size) - len(self.pool.tables.get(seq.pid, ())))
        return cap is not None and self.pool.used_by(seq.user) + need > cap

    def _ensure(self, seq: Sequence, tokens: int) -> bool:
        """Grow ``seq``'s block table to ``tokens`` slots (growing a dynamic pool if need be) and bring its
        swapped-out KV back into the new blocks; no preemption."""
        try:
            self.pool.ensure(seq.pid, max(tokens, seq.computed), seq.user)
        except OutOfMemory:
            if self.kv_policy != "dynamic" or not self._grow():
                return False
            return self._ensure(seq, tokens)
        if seq.swap is not None:
            self._swap_in(seq)
            self._drop_swap(seq)
            self.swaps_in += 1
        elif seq.spilled:
            if self._spill_in(seq):
                self.swaps_in += 1
            else:  # unreadable (an I/O error): recomputed from the start in the blocks it now holds, never an error
                self.recomputed_tokens += seq.computed
                seq.computed = 0
            self._drop_swap(seq)
        return True

    def _grow(self) -> bool:
        """The dynamic policy: double the pool (up to its maximum) while the host has the memory."""
        import psutil

        new = min(self.max_blocks, 2 * self.pool.num_blocks)
        extra = new - self.pool.num_blocks
        nbytes = extra * self.pool.block_size * self.kv_token_bytes
        if extra <= 0 or (self.device.type == "cpu" and psutil.virtual_memory().available < nbytes + 2**30):
            return False
        self._grow_cache(extra)
        self.pool.grow(new)
        return True

    def _grow_cache(self, extra: int) -> None:
        """Engines that hold the KV tensors themselves add ``extra`` blocks to them."""

    def _shrink_if_idle(self) -> None:
        """The dynamic policy gives memory back once no sequence holds blocks."""
        if self.kv_policy == "dynamic" and not self.pool.tables and self.pool.num_blocks > self.initial_blocks:
            self.pool.reset(self.initial_blocks)
            self._shrink_cache(self.initial_blocks)

    def _shrink_cache(self, blocks: int) -> None:
        """Engines that hold the KV tensors themselves cut them to ``blocks``."""
