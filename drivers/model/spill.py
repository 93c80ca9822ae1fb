"""The spill area: swapped-out KV blocks a worker keeps on disk when its host swap area is full or host memory is short.

The second tier of a context switch's swap (the engine's order on a swap-out: host swap area, then
spill, then recompute). Each model worker has its own LMDB environment, ``$LLMOS_HOME/store/spill/<worker
pid>/`` (owner-only), opened by the worker itself with the storage driver's ``Store``: the data is
private and short-lived, so the kernel's Writer never sees it, and no KV block is copied through the
kernel's loop. It is opened at the first spill, removed when the engine closes (the worker exits), and
a dead worker's is removed at the next worker's start (:func:`remove_stale`).

One value per KV block: key ``pid`` (8 bytes BE, signed) + block index (4 bytes BE); value the block's
keys then values for layer 0, then layer 1..., each ``block_size * kv_heads * head_dim`` elements in the
cache's dtype (``block_bytes`` in all). The area never holds more than ``budget_bytes`` (the
``spill_bytes`` option) nor takes the disk below ``disk_margin`` bytes free; a spill that does not fit,
or whose write fails (disk full, an I/O error, a directory it cannot create), leaves nothing behind and
returns False: the engine then drops the KV (recompute), never an error.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Sequence

from llmos.syscalls.errors import InvalidArgument, LLMOSError

DEFAULT_SPILL_BYTES = 8 << 30  # the spill area's bound when the load options give none
DISK_MARGIN_BYTES = 1 << 30  # free disk a spill never takes: the store, logs and everyone else need it too
BELOW_FRACTION = 10  # host memory is short below 1/10 of RAM...
BELOW_CAP_BYTES = 1 << 30  # ...or below 1 GiB, whichever is smaller
MAX_MAP_BYTES = 1 << 40  # the most address space an area maps at open
CHUNK_BYTES = 64 << 20  # blocks per write (or read) transaction: LMDB holds a write's dirty pages in memory
DB = "spill"
_KEY = struct.Struct(">qI")


def default_spill_below() -> int:
    """The default ``spill_below_bytes``: a tenth of the host's RAM or 1 GiB, whichever is smaller."""
    import psutil

    return min(psutil.virtual_memory().total // BELOW_FRACTION, BELOW_CAP_BYTES)


def spill_root(home: Path | str) -> Path:
    """Where workers' spill areas live: ``home/store/spill``."""
    return Path(home) / "store" / "spill"


def remove_stale(root: Path | str) -> list[int]:
    """Remove the spill areas under ``root`` whose worker (the directory's name, a pid) is no longer alive;
    returns their pids. Called by a worker at start: a worker killed with -9 cannot remove its own."""
    removed = []
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return removed  # no spill root yet (nothing ever spilled here), or one we cannot read
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            os.kill(int(entry.name), 0)
            continue  # alive (or another user's live process): its area is in use
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(int(entry.name))
    return removed


def _key(pid: int, index: int) -> bytes:
    return _KEY.pack(pid, index)


class SpillArea:
    """One worker's spill area at ``path`` for KV blocks of ``block_bytes`` bytes each.

    ``budget_bytes``: most bytes held (0: never spill). ``below_bytes``: host memory (psutil's available)
    below which the host swap area is passed over (default :func:`default_spill_below`). ``disk_margin``:
    free bytes a spill leaves on the area's filesystem. Not thread-safe: the engine's thread uses it.
    """

    def __init__(self, path: Path | str, block_bytes: int, budget_bytes: int = DEFAULT_SPILL_BYTES,
                 below_bytes: int | None = None, disk_margin: int = DISK_MARGIN_BYTES) -> None:
        if budget_bytes < 0 or (below_bytes is not None and below_bytes < 0) or disk_margin < 0 or block_bytes < 1:
            raise InvalidArgument(f"spill_bytes and spill_below_bytes must be at least 0, got {budget_bytes} "
                                  f"and {below_bytes}")
        self.path = Path(path)
        self.block_bytes = int(block_bytes)
        self.budget_bytes = int(budget_bytes)
        self.below_bytes = default_spill_below() if below_bytes is None else int(below_bytes)
        self.disk_margin = int(disk_margin)
        self.held: dict[int, int] = {}  # pid -> blocks it has here (indices 0..n-1)
        self.spills = 0  # sequences written here, in all
        self.failures = 0  # spills that did not fit or failed (the KV was dropped instead)
        self.last_error = ""  # why the last failed one failed, for the operator
        self._store = None

    # -- state ----------------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        """Blocks held now."""
        return sum(self.held.values())

    @property
    def used_bytes(self) -> int:
        """Bytes of KV held now (values only: LMDB's pages and file add a little)."""
        return self.blocks * self.block_bytes

    def host_short(self) -> bool:
        """True when host memory available (psutil) is below ``below_bytes``: a swap-out then skips the host area."""
        import psutil

        return psutil.virtual_memory().available < self.below_bytes

    def fits(self, blocks: int) -> bool:
        """True when ``blocks`` more blocks stay within the budget and leave ``disk_margin`` free on the disk."""
        need = blocks * self.block_bytes
        if self.used_bytes + need > self.budget_bytes:
            return False
        where = self.path
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            return need <= shutil.disk_usage(where).free - self.disk_margin
        except OSError:
            return False

    # -- blocks ---------------------------------------------------------------------------------
    def write(self, pid: int, blocks: int, rows: Callable[[int, int], Sequence[object]]) -> bool:
        """Write ``pid``'s first ``blocks`` blocks; ``rows(lo, hi)`` gives blocks lo..hi-1 as bytes-like values of
        ``block_bytes`` each. True once all are stored; False (nothing of them kept) when they do not fit or the
        write fails. A pid's earlier blocks here are replaced."""
        self.drop(pid)
        if blocks < 1 or not self.fits(blocks):
            return self._failed(f"{blocks} blocks of {self.block_bytes} bytes do not fit the spill area "
                                f"({self.used_bytes} of {self.budget_bytes} bytes used; "
                                f"{self.disk_margin} bytes of disk kept free)")
        step = max(1, CHUNK_BYTES // self.block_bytes)
        try:
            store = self._open()
            db = store.db(DB)
            for lo in range(0, blocks, step):
                values = rows(lo, min(blocks, lo + step))

                def put(txn, lo=lo, values=values):  # may run again after the map grew: acts only through txn
                    for i, value in enumerate(values):
                        txn.put(_key(pid, lo + i), value, db=db)

                store.write_txn(put)
                self.held[pid] = lo + len(values)  # what is stored so far, so a failure below removes it
        except (LLMOSError, OSError) as exc:
            self.drop(pid)
            return self._failed(f"{type(exc).__name__}: {getattr(exc, 'message', exc)}")
        self.spills += 1
        return True

    def read(self, pid: int, into: Callable[[int, list[memoryview]], None]) -> bool:
        """Hand ``pid``'s blocks to ``into(lo, values)`` in order, a chunk at a time (the memoryviews are valid
        during the call only); True when all were read, False when any is missing or unreadable."""
        blocks = self.held.get(pid, 0)
        if not blocks or self._store is None:
            return False
        step = max(1, CHUNK_BYTES // self.block_bytes)
        try:
            db = self._store.db(DB)
            for lo in range(0, blocks, step):
                with self._store.read() as txn:
                    values = [txn.get(_key(pid, i), db=db) for i in range(lo, min(blocks, lo + step))]
                    if any(v is None or len(v) != self.block_bytes for v in values):
                        self.last_error = f"pid {pid}'s spilled blocks {lo}.. are missing or cut"
                        return False
                    into(lo, values)
        except (LLMOSError, OSError) as exc:
            self.last_error = f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
            return False
        return True

    def drop(self, pid: int, keep: int = 0) -> None:
        """Forget ``pid``'s blocks from index ``keep`` on (all by default). Their pages are freed for later spills;
        a failure to delete only leaves them until the area is removed."""
        had = self.held.pop(pid, 0)
        if keep > 0 and had:
            self.held[pid] = min(keep, had)
        if had <= keep or self._store is None:
            return

        def delete(txn) -> None:
            db = self._store.db(DB)
            for i in range(keep, had):
                txn.delete(_key(pid, i), db=db)

        try:
            self._store.write_txn(delete)
        except (LLMOSError, OSError):
            pass  # the keys are unreachable (held says so) and removed with the area

    # -- life cycle -----------------------------------------------------------------------------
    def _open(self):
        if self._store is None:
            from llmos.drivers.storage.env import Store

            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path.parent, 0o700)
            # address space for the whole budget at once, up to 1 TiB (the map doubles past it, as any Store's)
            room = min(self.budget_bytes + self.budget_bytes // 4, MAX_MAP_BYTES) + (64 << 20)
            self._store = Store(self.path, map_size=room).open()
        return self._store

    def _failed(self, why: str) -> bool:
        self.failures += 1
        self.last_error = why
        return False

    def close(self) -> None:
        """Close the environment and remove its directory (idempotent)."""
        store, self._store = self._store, None
        self.held.clear()
        if store is not None:
            try:
                store.close()
            except LLMOSError:
                pass
        shutil.rmtree(self.path, ignore_errors=True)

    def stats(self) -> dict[str, int]:
        """The engine stats' spill counters: ``spills`` (in all), ``spilled_blocks`` and ``spill_bytes_used``
        (held now), ``spill_failures`` (in all: the KV was dropped instead)."""
        return {"spills": self.spills, "spilled_blocks": self.blocks, "spill_bytes_used": self.used_bytes,
                "spill_failures": self.failures}
