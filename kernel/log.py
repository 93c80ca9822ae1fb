"""Structured logging: one JSON object per line on stderr (and wherever stderr is redirected), and the ring.

Every field is bounded (FIELD_CHARS): a client's strings reach the log only as a short prefix
with their length, so no request can make a log line big. In the kernel every line also goes to
the log ring (:class:`LogRing`): the last LOG_RING lines in the store's ``log`` database, which
``dmesg`` and ``/var/log/kernel`` read, across restarts.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import threading
import time
from typing import Any, Callable, TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FIELD_CHARS = 300  # a string field longer than this is cut (the cut says how long it was)


def bounded(value: Any, limit: int = FIELD_CHARS) -> Any:
    """``value`` if it is small; a string cut to ``limit`` characters (with its length) otherwise."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except RecursionError:
            text = f"<{type(value).__name__} nested too deeply>"
    if len(text) <= limit:
        return value
    return f"{text[:limit]}... ({len(text)} characters)"


Sink = Callable[[dict], None]
_sinks: list[Sink] = []  # who else gets every record (the kernel's log ring); called on the logging thread


def add_sink(sink: Sink) -> None:
    """Give ``sink`` every record logged in this process from now on. A sink must not block or raise."""
    _sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


class Logger:
    def __init__(self, component: str, stream: TextIO | None = None, level: str = "info", ring: bool = True) -> None:
        self.component = component
        self.stream = stream
        self.threshold = _LEVELS[level]
        self.ring = ring  # False: stderr only (the ring's own complaints must not feed the ring)

    def log(self, level: str, event: str, **fields: Any) -> None:
        if _LEVELS[level] < self.threshold:
            return
        record = {"ts": round(time.time(), 6), "level": level, "component": self.component, "event": event}
        record.update({k: bounded(v) for k, v in fields.items()})
        stream = self.stream or sys.stderr
        try:
            stream.write(json.dumps(record, default=str) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must never take the kernel down
        if self.ring:
            for sink in _sinks:
                try:
                    sink(record)
                except Exception:
                    pass  # the ring is a copy: losing a line there must never fail the caller

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)


def get_logger(component: str) -> Logger:
    return Logger(component)


# -- the log ring ---------------------------------------------------------------------------------------
LOG_RING = 10_000  # lines kept in the store (older ones are deleted as new ones land)
LINE_BYTES = 8192  # one line in the ring at most (fields are bounded; many fields could still add up)
FLUSH_S = 0.05  # lines wait this long for company before they go to the writer: one commit carries many
FOLLOW_QUEUE = 10_000  # lines a slow ``dmesg -f`` may fall behind before it is told it lost some


def seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


class LogRing:
    """The last LOG_RING log lines, kept in the store's ``log`` database (key: seq, 8 bytes big-endian;
    value: the line, JSON with its ``seq``), written through the Writer in batches.

    A logged record is numbered and queued at once (any thread); a task on the kernel's loop hands what
    has queued to the writer every FLUSH_S as one op, which the writer groups with whatever else is
    being written. Logging never waits for the store and never fails because of it: a stuck or failed
    writer costs ring lines (at most LOG_RING wait in memory), never a log call. ``tail`` and
    ``subscribe`` serve ``dmesg``; ``text`` is ``/var/log/kernel``.
    """

    def __init__(self, store: Any, writer: Any, size: int = LOG_RING, flush_s: float = FLUSH_S) -> None:
        self.store, self.writer, self.size, self.flush_s = store, writer, size, flush_s
        self._pending: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=size)
        self._lock = threading.Lock()  # seq numbering and the pending queue: any thread logs
        self._followers: set[asyncio.Queue] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pid = os.getpid()
        self.seq = 0  # the last seq given out
        self.lost = 0  # lines the store never got (writer failed or fell LOG_RING behind)
        self._complain = Logger("logring", ring=False)

    # -- life ------------------------------------------------------------------------------------------
    def start(self) -> "LogRing":
        """Continue the numbering after what the store holds, and take every record from now on (call on the
        kernel's loop)."""
        self.seq = self._last_stored()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._flusher(), name="logring:flush")
        add_sink(self.record)
        return self

    async def stop(self) -> None:
        """Stop taking records and hand the last ones to the writer (before the writer stops)."""
        remove_sink(self.record)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self._flush()

    def _last_stored(self) -> int:
        with self.store.read() as txn:
            cur = txn.cursor(db=self.store.db("log"))
            return int.from_bytes(bytes(cur.key()), "big") if cur.last() else 0

    # -- the sink ----------------------------------------------------------------------------------------
    def record(self, record: dict) -> None:
        """The Logger sink: number the record, queue it for the store, show it to followers. Never blocks."""
        if os.getpid() != self._pid:
            return  # a forked child's logging is not this kernel's log
        with self._lock:
            self.seq += 1
            seq = self.seq
            line = json.dumps({"seq": seq, **record}, default=str)
            if len(line) > LINE_BYTES:
                line = json.dumps({"seq": seq, **{k: record.get(k) for k in ("ts", "level", "component", "event")},
                                   "cut": f"{len(line)} characters"})
            if len(self._pending) == self._pending.maxlen:
                self.lost += 1
            self._pending.append((seq, line.encode()))
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if threading.get_ident() == self._loop_thread:
                self._notify(seq, line)
            else:
                loop.call_soon_threadsafe(self._notify, seq, line)
        except RuntimeError:
            pass  # the loop is closing

    def _notify(self, seq: int, line: str) -> None:
        if self._wake is not None:
            self._wake.set()
        for q in list(self._followers):
            if q.qsize() < FOLLOW_QUEUE:
                q.put_nowait((seq, line))
            elif q.qsize() == FOLLOW_QUEUE:
                q.put_nowait((seq, json.dumps({"seq": seq, "level": "warning", "component": "logring",
                                               "event": "follower_lagging", "note": "lines were skipped"})))

    async def _flusher(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.flush_s)  # let lines gather: one writer op (and commit) for many
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        with self._lock:
            batch = list(self._pending)
            self._pending.clear()
        if not batch:
            return
        from llmos.drivers.storage.ops import Call

        try:
            # shielded: a stop() that cancels the flusher must not cancel a batch already handed over
            await asyncio.shield(self.writer.do(Call(lambda txn: self._apply(txn, batch))))
        except Exception as exc:  # a full disk, a stopped writer: the ring loses lines, the kernel goes on
            self.lost += len(batch)
            self._complain.warning("log_ring_write_failed", lines=len(batch), error=repr(exc))

    def _apply(self, txn: Any, batch: list[tuple[int, bytes]]) -> int:
        """Write ``batch`` and delete what falls out of the ring (in the writer's transaction)."""
        db = self.store.db("log")
        for seq, line in batch:
            txn.put(seq_key(seq), line, db=db)
        cutoff = seq_key(max(0, batch[-1][0] - self.size + 1))
        cur = txn.cursor(db=db)
        removed = 0
        if cur.first():
            while bytes(cur.key()) < cutoff and cur.delete():
                removed += 1
        return removed

    # -- readers -----------------------------------------------------------------------------------------
    def tail(self, n: int, since: int | None = None) -> tuple[list[str], int]:
        """(lines, newest seq): the last ``n`` lines, or with ``since`` every line after that seq (at most
        the ring). Lines still on their way to the store are included."""
        with self._lock:
            pending = list(self._pending)  # first: a line drained meanwhile is then in the store
        got: dict[int, bytes] = {}
        with self.store.read() as txn:
            cur = txn.cursor(db=self.store.db("log"))
            if since is not None:
                if cur.set_range(seq_key(since + 1)):
                    got.update((int.from_bytes(bytes(k), "big"), bytes(v)) for k, v in cur.iternext())
            elif n > 0 and cur.last():
                for k, v in cur.iterprev():
                    got[int.from_bytes(bytes(k), "big")] = bytes(v)
                    if len(got) >= n:
                        break
        got.update(p for p in pending if since is None or p[0] > since)
        seqs = sorted(got)
        if since is None:
            seqs = seqs[-n:] if n else []
        else:
            seqs = seqs[-self.size:]
        newest = seqs[-1] if seqs else since if since is not None else self.seq
        return [got[s].decode() for s in seqs], newest

    def text(self) -> bytes:
        """The ring as one text: every line it holds, oldest first, each ending with a newline."""
        lines, _ = self.tail(self.size)
        return "".join(line + "\n" for line in lines).encode()

    def subscribe(self) -> asyncio.Queue:
        """A queue of (seq, line) for every line logged from now on (on the kernel's loop)."""
        q: asyncio.Queue = asyncio.Queue()
        self._followers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._followers.discard(q)
