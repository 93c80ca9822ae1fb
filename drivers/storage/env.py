"""The Store: one LMDB environment per process, its read transactions and its one write path.

Who owns what: the LMDB environment belongs to the process that opened it (the fork guard refuses
any other); within that process, ``_gate`` is a readers-writer lock whose readers are transactions and
whose one exclusive holder is a map resize (LMDB requires that no transaction of this process be live
while ``mdb_env_set_mapsize`` remaps the file).
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import lmdb

from llmos.drivers.storage.errors import StorageError, storage_error
from llmos.drivers.storage.layout import DBS, MAX_DBS
from llmos.syscalls.errors import InvalidArgument, NotFound

T = TypeVar("T")
MAX_MAP_BYTES = 1 << 44  # growth stops here (16 TiB of address space); the disk fills long before
WRITER_MAP_BYTES = 64 << 20  # a writable store's first map; it doubles as needed
# A read-only store maps this much address space at once (the file is mapped read-only; pages past its end are
# never touched), so a reader that holds a transaction for long (a model's zero-copy weights) never has to remap
# while the writer's process grows the store: a remap is impossible while any transaction of the process lives.
READER_MAP_BYTES = 1 << 40
ADOPT_WAIT_S = 30.0  # how long a read waits for this process's other transactions before it can remap


_forks = [0]  # bumped in every forked child: a Store remembers the value it was opened under (no getpid per call)
os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


def store_dir(home: Path | str) -> Path:
    """Where the store of ``$LLMOS_HOME`` lives: ``home/store``."""
    return Path(home) / "store"


class _Gate:
    """Readers-writer lock: many transactions, or one resize. A thread already inside may enter again
    (a read nested in a write's ``Call``); a waiting resize stops new entries from other threads."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._resizing = False
        self._waiting = 0
        self._depth = threading.local()

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        with self._cond:
            while depth == 0 and (self._resizing or self._waiting):
                self._cond.wait()
            self._inside += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """Wait until no transaction is live (at most ``timeout`` s: then StorageError)."""
        if getattr(self._depth, "n", 0):
            raise StorageError("the store's map cannot be resized from inside one of its transactions")
        with self._cond:
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: not (self._resizing or self._inside), timeout):
                    raise StorageError(
                        f"the store grew past this process's map, and a transaction of this process has stayed "
                        f"open for over {timeout} s (pinned zero-copy data?), so the map cannot be remapped: "
                        f"open the store with a bigger map_size")
            finally:
                self._waiting -= 1
                self._cond.notify_all()
            self._resizing = True
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class Store:
    """One LMDB environment (``path``: the store directory, see ``store_dir``).

    Readers anywhere (``read``); writes only through ``write_txn``, which the Writer's thread calls
    (and tools and tests with no kernel). ``map_size``: the initial map in bytes (default 64 MiB, or
    1 TiB of address space when read-only); it doubles whenever a write needs more. Durable: fsync at every commit (sync, metasync), no writes through the map.
    """

    def __init__(self, path: Path | str, *, readonly: bool = False, map_size: int | None = None) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.map_size = map_size if map_size is not None else READER_MAP_BYTES if readonly else WRITER_MAP_BYTES
        self.stale_readers_cleared = 0  # what reader_check cleared at open
        self.map_grows = 0
        self._env: lmdb.Environment | None = None
        self._dbs: dict[str, object] = {}
        self._pid = 0
        self._fork_gen = -1
        self._gate = _Gate()
        self._dbs_lock = threading.Lock()

    # -- life cycle ---------------------------------------------------------------------------------
    def open(self) -> "Store":
        """Create the directory (0700) and files (0600) if need be, open them, clear stale reader slots.
        Raises StorageError (EIO) or NoSpace (ENOSPC)."""
        try:
            if not self.readonly:
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(self.path, 0o700)  # mkdir's mode passed through the umask, and the dir may be old
            data = self.path / "data.mdb"
            on_disk = data.stat().st_size if data.exists() else 0
            self._env = lmdb.open(str(self.path), map_size=max(self.map_size, on_disk), subdir=True,
                                  readonly=self.readonly, max_dbs=MAX_DBS, mode=0o600, sync=True, metasync=True,
                                  writemap=False, create=not self.readonly, max_readers=512)
            self._pid, self._fork_gen = os.getpid(), _forks[0]
            if not self.readonly:
                for name in ("data.mdb", "lock.mdb"):
                    os.chmod(self.path / name, 0o600)
            self.stale_readers_cleared = self._env.reader_check()
            self.map_size = self._env.info()["map_size"]
            for name in DBS:
                self._open_db(name)
        except (lmdb.Error, OSError) as exc:
            self._drop()
            raise storage_error(exc, self.path, "opening") from None
        except BaseException:
            self._drop()
            raise
        return self

    def close(self) -> None:
        """Close the environment (in a forked child only drop it: the files belong to the parent)."""
        if self._env is not None and self._fork_gen == _forks[0]:
            with self._gate.exclusive():
                self._env.close()
        self._drop()

    def _drop(self) -> None:
        self._env, self._dbs = None, {}

    def __enter__(self) -> "Store":
        return self.open() if self._env is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- access -------------------------------------------------------------------------------------
    def env(self) -> lmdb.Environment:
        """The LMDB environment, after the fork and open checks (StorageError). Package-internal."""
        if self._env is None:
            raise StorageError(f"store {str(self.path)!r} is not open")
        if self._fork_gen != _forks[0]:
            raise StorageError(f"store {str(self.path)!r} was opened by pid {self._pid} and cannot be used in "
                               f"forked child {os.getpid()}: LMDB handles do not cross a fork; open a new Store "
                               f"in the child")
        return self._env

    def db(self, name: str):
        """The handle of the named database (created on first use unless read-only; NotFound if absent)."""
        handle = self._dbs.get(name)
        if handle is not None and self._fork_gen == _forks[0]:
            return handle
        self.env()
        return self._open_db(name)

    def _open_db(self, name: str):
        with self._dbs_lock:
            if name not in self._dbs:
                try:
                    self._dbs[name] = self.env().open_db(name.encode(), create=not self.readonly)
                except lmdb.NotFoundError:
                    raise NotFound(f"store {str(self.path)!r} has no database {name!r}") from None
                except lmdb.Error as exc:
                    raise storage_error(exc, self.path, f"opening database {name!r}") from None
            return self._dbs[name]

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction (``buffers=True``: values are memoryviews into the map, valid until the
        block ends). Retries after another process grew the map. StorageError in a forked child."""
        env = self.env()
        while True:
            with self._gate.shared():
                try:
                    txn = env.begin(buffers=True)
                except lmdb.MapResizedError:
                    txn = None
                except lmdb.Error as exc:
                    raise storage_error(exc, self.path, "beginning a read") from None
                if txn is not None:
                    try:
                        yield txn
                    except lmdb.Error as exc:
                        raise storage_error(exc, self.path, "reading") from None
                    finally:
                        txn.abort()
                    return
            self._adopt_map_size()

    def write_txn(self, fn: Callable[[lmdb.Transaction], T], reserve: int = 0) -> T:
        """Run ``fn`` in one write transaction and commit it; returns what ``fn`` returned.

        ``reserve``: about how many bytes ``fn`` writes. The map is grown first while less than twice that
        (and under half the map) is free: LMDB was seen to stall inside a write that ran into a full map while
        other threads of this process kept reading, so a write should never find the map full. A full map is
        still grown (x2) and ``fn`` run again from the start, so ``fn`` must only act through its
        transaction. StorageError (EIO) or NoSpace (ENOSPC) if the commit fails: nothing of it is kept.
        Only the Writer's thread calls this while a kernel runs."""
        if self.readonly:
            raise InvalidArgument(f"store {str(self.path)!r} is open read-only")
        env = self.env()
        while self._short_of(2 * reserve):
            self._grow()
        while True:
            with self._gate.shared():
                try:
                    txn = env.begin(write=True)
                except lmdb.MapResizedError:
                    txn = None
                except lmdb.Error as exc:
                    raise storage_error(exc, self.path, "beginning a write") from None
                if txn is not None:
                    try:
                        result = fn(txn)
                        txn.commit()
                        return result
                    except lmdb.MapFullError:
                        txn.abort()
                    except lmdb.Error as exc:
                        txn.abort()
                        raise storage_error(exc, self.path, "writing") from None
                    except BaseException:
                        txn.abort()
                        raise
            if txn is None:
                self._adopt_map_size()
            else:
                self._grow()

    # -- the map ------------------------------------------------------------------------------------
    def _short_of(self, need: int) -> bool:
        """Whether the map has less than ``need`` bytes past its last used page, or is over half used."""
        try:
            info = self.env().info()
            used = (info["last_pgno"] + 1) * self.env().stat()["psize"]
        except lmdb.Error:
            return False
        room = info["map_size"] - used
        return info["map_size"] < MAX_MAP_BYTES and (room < need or used > info["map_size"] // 2)

    def _grow(self) -> None:
        with self._gate.exclusive():
            env = self.env()
            env.reader_check()  # a dead reader pins pages: free them before taking more address space
            size = env.info()["map_size"]
            if size >= MAX_MAP_BYTES:
                raise StorageError(f"store {str(self.path)!r}: the map reached {size} bytes and may not grow")
            try:
                env.set_mapsize(min(size * 2, MAX_MAP_BYTES))
            except lmdb.Error as exc:
                raise storage_error(exc, self.path, "growing the map") from None
            self.map_size = env.info()["map_size"]
            self.map_grows += 1

    def _adopt_map_size(self) -> None:
        with self._gate.exclusive(ADOPT_WAIT_S):
            try:
                self.env().set_mapsize(0)  # 0: take the size the writer's process recorded
            except lmdb.Error as exc:
                raise storage_error(exc, self.path, "adopting the grown map") from None
            self.map_size = self.env().info()["map_size"]

    # -- stats --------------------------------------------------------------------------------------
    def readers(self) -> int:
        """Reader slots in use in the lock file (all processes), as LMDB reports them."""
        lines = self.env().readers().strip().splitlines()
        return max(0, len(lines) - 1) if lines and "pid" in lines[0] else 0

    def file_bytes(self) -> int:
        """The size of data.mdb on disk."""
        return (self.path / "data.mdb").stat().st_size

    def gc_orphans(self) -> int:
        """Free every inode no path points to (uploads never committed, a kernel killed mid-upload);
        returns how many. The kernel calls this at start, before its Writer serves uploads."""
        from llmos.drivers.storage.uploads import gc_orphans

        return self.write_txn(lambda txn: gc_orphans(txn, self))
