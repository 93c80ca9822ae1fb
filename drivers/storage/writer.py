"""The Writer: the one thread that writes the store, committing whatever is queued as one transaction.

Callers (the kernel's asyncio loop, tools) submit ops and get futures. The thread takes everything
queued (group commit: while one commit's fsync runs, the next batch gathers), applies each op in a
nested transaction of the batch's transaction, commits once, then resolves each future with that
op's own result or error. An op that fails is rolled back alone. If the commit itself fails (disk
full, I/O error), each op of the batch is tried again in a transaction of its own, so that only the
ops that cannot be written fail.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import lmdb

from llmos.drivers.storage import ops as _ops
from llmos.drivers.storage.errors import StorageError, storage_error
from llmos.drivers.storage.layout import UPLOAD_IDLE_S
from llmos.syscalls.errors import LLMOSError

MAX_BATCH_OPS = 4096  # ops per transaction
MAX_BATCH_BYTES = 256 << 20  # data per transaction (the dirty pages of a txn live in RAM)
TICK_S = 5.0  # how often an idle writer looks for idle uploads and stale readers

_STOP = object()


class Writer:
    """The store's single writer thread. ``clock``: monotonic seconds (injected in tests);
    ``upload_idle_s``: an upload with no Append for this long is aborted."""

    def __init__(self, store, *, clock: Callable[[], float] = time.monotonic,
                 upload_idle_s: float = UPLOAD_IDLE_S) -> None:
        self.store = store
        self.stats: dict[str, float] = {"commits": 0, "ops": 0, "bytes": 0, "mean_ops_per_commit": 0.0,
                                        "failed_commits": 0, "idle_uploads_aborted": 0}
        self._clock = clock
        self._upload_idle_s = upload_idle_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _stopped against a submit racing stop
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._upload_seen: dict[int, float] = {}  # upload id -> clock() of its last Begin/Append (writer thread)

    def start(self) -> "Writer":
        self._thread = threading.Thread(target=self._run, name="llmos-storage-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Commit everything queued, then end the thread; later submits fail with StorageError."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._queue.put(_STOP)
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join()

    def submit(self, op: _ops.Op) -> Future:
        """Queue ``op`` (thread-safe); the future resolves once its transaction committed (or failed)."""
        fut: Future = Future()
        if self._pid != os.getpid():
            fut.set_exception(StorageError("the store's Writer cannot be used in a forked child: it lives in "
                                           f"pid {self._pid}"))
            return fut
        with self._lock:
            if self._stopped or self._thread is None:
                fut.set_exception(StorageError("the store's Writer is not running"))
                return fut
            self._queue.put((op, fut))
        return fut

    async def do(self, op: _ops.Op) -> Any:
        """Submit ``op`` and await its result (raises what the op raised)."""
        return await asyncio.wrap_future(self.submit(op))

    # -- the thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=TICK_S)
            except queue.Empty:
                self._reap_idle_uploads()
                self._check_readers()
                continue
            batch, size = [], 0
            item = first
            while True:
                if item is _STOP:
                    stopping = True
                elif item[1].set_running_or_notify_cancel():
                    batch.append(item)
                    size += _ops.size_of(item[0])
                if stopping or len(batch) >= MAX_BATCH_OPS or size >= MAX_BATCH_BYTES:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self._commit(batch)
                except BaseException as exc:  # a bug here must not leave callers waiting forever
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(storage_error(exc, self.store.path, "committing"))
            self._reap_idle_uploads()

    def _commit(self, batch: list[tuple[_ops.Op, Future]]) -> None:
        outcomes: list[tuple[bool, Any]] = []

        def run(txn: lmdb.Transaction) -> None:
            outcomes.clear()  # a rerun after the map grew starts over
            for op, _ in batch:
                outcomes.append(self._apply_one(op, txn))

        try:
            self.store.write_txn(run, reserve=sum(_ops.size_of(op) for op, _ in batch))
        except LLMOSError as exc:  # the commit failed: nothing of the batch is kept
            self.stats["failed_commits"] += 1
            if len(batch) > 1:
                for item in batch:
                    self._commit([item])
            else:
                batch[0][1].set_exception(exc)
            return
        self.stats["commits"] += 1
        self.stats["ops"] += len(batch)
        self.stats["bytes"] += sum(_ops.size_of(op) for op, _ in batch)
        self.stats["mean_ops_per_commit"] = self.stats["ops"] / self.stats["commits"]
        now = self._clock()
        for (op, fut), (ok, value) in zip(batch, outcomes):
            self._note_upload(op, ok, value, now)
            (fut.set_result if ok else fut.set_exception)(value)

    def _apply_one(self, op: _ops.Op, txn: lmdb.Transaction) -> tuple[bool, Any]:
        child = self.store.env().begin(write=True, parent=txn)
        try:
            result = _ops.apply(op, child, self.store)
            child.commit()
            return True, result
        except (lmdb.MapFullError, lmdb.TxnFullError):
            child.abort()
            raise  # the whole transaction grows the map and reruns (or fails and is split)
        except lmdb.Error as exc:
            child.abort()
            return False, storage_error(exc, self.store.path, f"applying {type(op).__name__}")
        except Exception as exc:  # the op's own error (or a Call's fn's), for its caller alone
            child.abort()
            return False, exc

    def _note_upload(self, op: _ops.Op, ok: bool, value: Any, now: float) -> None:
        if isinstance(op, _ops.Begin) and ok:
            self._upload_seen[value] = now
        elif isinstance(op, _ops.Append) and ok:
            self._upload_seen[op.upload] = now
        elif isinstance(op, (_ops.Commit, _ops.Abort)):
            self._upload_seen.pop(op.upload, None)

    def _reap_idle_uploads(self) -> None:
        """Abort the uploads idle past their limit."""
        now = self._clock()
        idle = [u for u, seen in self._upload_seen.items() if now - seen >= self._upload_idle_s]
        for upload in idle:
            self._upload_seen.pop(upload, None)
            try:
                self.store.write_txn(lambda txn, u=upload: _ops.apply(_ops.Abort(u), txn, self.store))
                self.stats["idle_uploads_aborted"] += 1
            except LLMOSError:
                pass  # already gone (committed or aborted meanwhile), or the disk failed: the next open's gc frees it

    def _check_readers(self) -> None:
        """Clear the reader slots of dead processes (they pin pages the writer would reuse)."""
        try:
            self.store.env().reader_check()
        except (lmdb.Error, LLMOSError):
            pass
