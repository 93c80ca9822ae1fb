"""Captured intermediates, the kernel's side: the caps, and the writes under /proc/<pid>/capture/.

A spawn with ``capture`` is admitted here (:meth:`Captures.admit`): its request is checked against the
model (kinds its engine captures, layers, heads: EINVAL), and it gets a byte limit, the per-process cap
(``--max-capture-bytes``) or what is left of its user's (``--max-capture-bytes-per-user``: the user's stored
captures, plus the limits of its captures under way, which stay reserved until they are stored). The limit
and a key go to the worker in the process's params; the worker stops capturing at the limit, with a
warning. A user with nothing left gets a process that captures nothing, and a warning; never an error.

The worker sends each file in ``Captured`` pieces and then ``CaptureDone``, all before the step frame that
ends the process (``drivers/model/capture.py``); the executor hands them to :func:`deliver`. One task per
capture writes them through the storage Writer as uploads (Begin, Append, Commit: a file appears whole or not
at all, and at most WINDOW_BYTES of it wait in the writer's queue at once), then ``index.json``. Files:

    /proc/<pid>/capture/hidden_states/<layer>.npy   [tokens, hidden] float32
    /proc/<pid>/capture/attentions/<layer>.npy      [tokens, heads, tokens] float32
    /proc/<pid>/capture/index.json                  {tokens, heads, dtype, layers: {kind: [...]}, warnings}

owned by the process's owner (the /proc rule: its owner and the admin read them). Results (``wait``,
``stream``, ``close``) pass through :meth:`Captures.complete`, which waits until the capture is stored and
adds its warnings. A capture is not resumed after a kernel crash: pieces not yet committed are orphans the
store frees at its next open, and a process the journal resumes captures into a key this kernel never
issued, which is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from llmos.drivers.model import protocol as wp
from llmos.drivers.model.capture_spec import DTYPE, KINDS, CaptureSpec, file_bytes, resolve
from llmos.drivers.storage import ops
from llmos.kernel import messages as m
from llmos.kernel.log import get_logger
from llmos.syscalls.errors import InvalidArgument, LLMOSError, NoSuchProcess, quote

INDEX_RESERVE = 16 << 10  # bytes of a capture's limit kept for its index.json
WINDOW_BYTES = 8 << 20  # appended bytes of one capture waiting in the writer's queue, at most
FINISHED_KEPT = 4096  # warnings of stored captures kept for a later wait/stream/close (oldest dropped)
MAX_WARNINGS = 16


def capture_dir(pid: int) -> str:
    return f"/proc/{pid}/capture"


@dataclass(frozen=True)
class Request:
    """A spawn's capture fields, checked for what needs no model: kinds, layers and heads as given."""

    kinds: tuple[str, ...]
    layers: tuple[int, ...] | None
    heads: tuple[int, ...] | None


@dataclass
class Ticket:
    """An admitted capture: ``params`` goes in the process's params as ``capture`` (None: it captures nothing,
    and ``warnings`` say why)."""

    key: int
    params: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _File:
    upload: int | None  # None: skipped (its pieces are ignored)
    expected: int
    received: int = 0
    pending: collections.deque = field(default_factory=collections.deque)  # (future, bytes) of Appends in flight
    pending_bytes: int = 0


@dataclass
class _Capture:
    """One process's capture in the kernel, from admission until it is stored (or given up)."""

    key: int
    user: str
    reserved: int  # bytes of the user's cap it holds until it is stored
    pid: int | None = None
    warnings: list[str] = field(default_factory=list)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # pieces and CaptureDone, in arrival order
    task: asyncio.Task | None = None
    done: bool = False  # CaptureDone has arrived: nothing more will
    closed: bool = False  # given up: what arrives is dropped, what is open is aborted
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    written: int = 0  # bytes committed
    layers: dict[str, list[int]] = field(default_factory=dict)
    files: dict[tuple[str, int], _File] = field(default_factory=dict)


_current: "Captures | None" = None  # the kernel's, for the executors (one kernel per OS process)


def deliver(msg: Any) -> None:
    """Hand a worker's ``Captured``/``CaptureDone`` to the kernel's Captures (the executor calls this)."""
    if _current is not None:
        _current.receive(msg)


class Captures:
    """Admission, byte caps and storage of captured intermediates (see the module's docstring).

    ``writer``/``fs``: the store's Writer and FS; ``procman``: asked whether a capture's process still lives
    when its user's cap is computed. Sizes in bytes; ``max_bytes`` 0 turns captures off."""

    def __init__(self, writer: Any, fs: Any, procman: Any, *, max_bytes: int, max_bytes_per_user: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.writer, self.fs, self.procman = writer, fs, procman
        self.max_bytes, self.max_bytes_per_user = max_bytes, max_bytes_per_user
        self.clock = clock
        self.log = get_logger("capture")
        self._keys = itertools.count(1)
        self._live: dict[int, _Capture] = {}  # key -> capture not yet stored
        self._by_pid: dict[int, _Capture] = {}
        self._finished: collections.OrderedDict[int, list[str]] = collections.OrderedDict()  # pid -> warnings
        self._dropped: set[int] = set()  # keys whose late pieces were logged once

    def install(self) -> "Captures":
        """Make this the receiver of :func:`deliver`."""
        global _current
        _current = self
        return self

    # -- admission (sys_spawn) --------------------------------------------------------------------
    @staticmethod
    def request(args: dict[str, Any]) -> Request | None:
        """Take the capture fields out of a spawn's validated args; None when it asks no capture.
        InvalidArgument for an unknown or repeated kind, a negative layer or head, or layers or heads without
        a capture."""
        kinds, layers = args.pop("capture", ()), args.pop("capture_layers", None)
        heads = args.pop("capture_heads", None)
        if not kinds:
            if layers is not None or heads is not None:
                raise InvalidArgument("capture_layers and capture_heads need capture (attentions, hidden_states)")
            return None
        bad = [k for k in kinds if k not in KINDS]
        if bad or len(set(kinds)) != len(kinds):
            raise InvalidArgument(f"capture takes distinct kinds among {', '.join(KINDS)}; got {quote(list(kinds))}")
        for name, values in (("capture_layers", layers), ("capture_heads", heads)):
            if values is not None and any(v < 0 for v in values):
                raise InvalidArgument(f"{name} are numbers from 0; got {quote(list(values))}")
        if heads is not None and "attentions" not in kinds:
            raise InvalidArgument("capture_heads selects attention heads: it needs capture of attentions")
        return Request(tuple(kinds), None if layers is None else tuple(layers), None if heads is None else tuple(heads))

    async def admit(self, user: str, req: Request, info: dict[str, Any], session: bool) -> Ticket:
        """Check ``req`` against the model (``info``: its executor's, with engine, layers, heads, capture) and
        give it a byte limit. InvalidArgument (EINVAL) for a session or what the model cannot capture."""
        if session:
            raise InvalidArgument("a session cannot capture: its turns rewrite its context")
        layers, heads = int(info.get("layers") or 0), int(info.get("heads") or 0)
        resolve(CaptureSpec(req.kinds, req.layers, req.heads, 0, 0), layers, heads,
                tuple(info.get("capture") or ()), str(info.get("engine") or "model's"))
        key = next(self._keys)
        if self.max_bytes <= INDEX_RESERVE:
            return Ticket(key, None, [f"nothing captured: captures are off on this kernel (--max-capture-bytes "
                                      f"{self.max_bytes})"])
        await self._forget_ended(user)
        used = self._stored(user) + sum(c.reserved for c in self._live.values() if c.user == user)
        room = self.max_bytes_per_user - used
        if room <= INDEX_RESERVE:
            return Ticket(key, None, [f"nothing captured: {user}'s captures hold {used:,} of the "
                                      f"{self.max_bytes_per_user:,} bytes a user may keep (--max-capture-bytes-per-"
                                      f"user); remove old ones (/proc/<pid>/capture) to capture again"])
        if self.max_bytes <= room:
            limit, doc = self.max_bytes, "the per-process cap (--max-capture-bytes)"
        else:
            limit, doc = room, (f"what is left of {user}'s cap (--max-capture-bytes-per-user "
                                f"{self.max_bytes_per_user:,}; {used:,} stored or reserved)")
        self._live[key] = _Capture(key, user, limit)
        return Ticket(key, {"kinds": list(req.kinds), "layers": None if req.layers is None else list(req.layers),
                            "heads": None if req.heads is None else list(req.heads),
                            "max_bytes": limit - INDEX_RESERVE, "key": key, "limit_doc": doc})

    def bind(self, ticket: Ticket | None, pid: int) -> None:
        """The spawn succeeded: ``pid`` runs the capture (or, when it captures nothing, carries the warning)."""
        if ticket is None:
            return
        cap = self._live.get(ticket.key)
        if cap is None:
            self._remember(pid, ticket.warnings)
            return
        cap.warnings[:0] = ticket.warnings
        if cap.pid is None:
            cap.pid = pid
            self._by_pid[pid] = cap

    def release(self, ticket: Ticket | None) -> None:
        """The spawn failed: its reservation goes back."""
        if ticket is not None:
            cap = self._live.pop(ticket.key, None)
            if cap is not None and cap.pid is not None:
                self._by_pid.pop(cap.pid, None)

    def _stored(self, user: str) -> int:
        """Bytes of ``user``'s stored captures. A walk of /proc's files, in the loop: no capture can be
        committed and released between the walk and the reservations it is added to."""
        return sum(st.size for st in self.fs.walk("/proc") if st.owner == user and "/capture/" in st.path)

    async def _forget_ended(self, user: str) -> None:
        """Give up the user's captures whose process ended without sending one (KILL, a dead worker) and that
        nobody waited for: their reservations go back."""
        for cap in [c for c in self._live.values() if c.user == user and c.pid is not None and not c.done]:
            try:
                state = (await self.procman.ask(m.Stat(cap.pid, user)))["state"]
            except NoSuchProcess:
                state = "ZOMBIE"
            except LLMOSError:
                continue
            if state == "ZOMBIE" and not cap.done and not cap.closed:
                self._close(cap, "nothing captured: the process ended before its worker sent the capture")

    # -- pieces from the workers --------------------------------------------------------------------
    def receive(self, msg: Any) -> None:
        """A ``Captured`` piece or ``CaptureDone`` (synchronous, in frame order: the worker sends them before
        the frame that ends the process, so they are queued here before its result exists)."""
        cap = self._live.get(getattr(msg, "key", None))
        if cap is None or cap.closed or cap.done or (cap.pid is not None and cap.pid != msg.pid):
            if msg.key not in self._dropped and len(self._dropped) < FINISHED_KEPT:
                self._dropped.add(msg.key)
                self.log.info("capture_dropped", pid=msg.pid, key=msg.key,
                              why="unknown key (issued by an earlier kernel?)" if cap is None else
                              "the capture was given up or is complete")
            return
        if cap.pid is None:  # a piece may come before the spawn's handler binds the pid
            cap.pid = msg.pid
            self._by_pid[msg.pid] = cap
        if isinstance(msg, wp.CaptureDone):
            cap.done = True
        cap.queue.put_nowait(msg)
        if cap.task is None:
            cap.task = asyncio.get_running_loop().create_task(self._write(cap), name=f"capture:{msg.pid}")

    async def _write(self, cap: _Capture) -> None:
        try:
            while not cap.closed:
                msg = await cap.queue.get()
                if cap.closed:
                    break
                if isinstance(msg, wp.CaptureDone):
                    cap.warnings += msg.warnings
                    await self._abort_open(cap, "its worker sent it incomplete")
                    await self._index(cap, msg)
                    break
                await self._piece(cap, msg)
        except Exception as exc:  # a bug here loses this capture, never the kernel
            self.log.error("capture_failed", pid=cap.pid, error=repr(exc))
            cap.warnings.append(f"capture not stored: {type(exc).__name__}")
        finally:
            await self._abort_open(cap, None)
            self._finish(cap)

    async def _piece(self, cap: _Capture, msg: wp.Captured) -> None:
        where = f"{msg.kind}/{msg.layer}"
        if msg.kind not in KINDS or msg.dtype != DTYPE or not isinstance(msg.data, bytes):
            self.log.error("capture_bad_piece", pid=cap.pid, file=where, dtype=msg.dtype)
            return
        f = cap.files.get((msg.kind, msg.layer))
        if msg.start == 0:
            if f is not None and f.upload is not None:  # the file starts over (a restarted worker): drop the old
                await self._abort(f)
            expected = file_bytes(msg.shape)
            if cap.written + expected > cap.reserved - INDEX_RESERVE:
                cap.warnings.append(f"{where} not stored: its {expected:,} bytes pass the capture's limit")
                cap.files[(msg.kind, msg.layer)] = _File(None, expected)
                return
            f = cap.files[(msg.kind, msg.layer)] = _File(None, expected)
            if not await self._op(cap, where, ops.Begin(f"{capture_dir(cap.pid)}/{msg.kind}/{msg.layer}.npy",
                                                        cap.user), f):
                return
        elif f is None or f.upload is None or msg.start != f.received:
            if f is not None and f.upload is not None:
                await self._abort(f)
                cap.warnings.append(f"{where} not stored: its pieces came out of order")
            return
        if f.received + len(msg.data) > f.expected:
            await self._abort(f)
            cap.warnings.append(f"{where} not stored: more bytes than its shape holds")
            return
        fut = self.writer.submit(ops.Append(f.upload, msg.data))
        f.pending.append((asyncio.wrap_future(fut), len(msg.data)))
        f.received += len(msg.data)
        f.pending_bytes += len(msg.data)
        while f.pending_bytes > WINDOW_BYTES or (msg.last and f.pending):
            done, size = f.pending.popleft()
            f.pending_bytes -= size
            try:
                await done
            except LLMOSError as exc:
                await self._abort(f)
                cap.warnings.append(f"{where} not stored: {exc.message}"[:300])
                return
        if msg.last:
            if f.received != f.expected:
                await self._abort(f)
                cap.warnings.append(f"{where} not stored: {f.received:,} bytes of {f.expected:,}")
                return
            stat = await self._op(cap, where, ops.Commit(f.upload), f)
            if stat:
                f.upload = None
                cap.written += stat.size
                cap.layers.setdefault(msg.kind, []).append(int(msg.layer))

    async def _op(self, cap: _Capture, where: str, op: Any, f: _File) -> Any:
        """Run a Begin or Commit; a storage error (ENOSPC, EIO) loses this file, with a warning."""
        try:
            out = await self.writer.do(op)
        except LLMOSError as exc:
            await self._abort(f)
            cap.warnings.append(f"{where} not stored: {exc.message}"[:300])
            return None
        if isinstance(op, ops.Begin):
            f.upload = out
        return out

    async def _abort(self, f: _File) -> None:
        upload, f.upload = f.upload, None
        for done, _ in f.pending:
            try:
                await done
            except LLMOSError:
                pass
        f.pending.clear()
        f.pending_bytes = 0
        if upload is not None:
            try:
                await self.writer.do(ops.Abort(upload))
            except LLMOSError:
                pass  # gone already (idle, or the store failed): the store frees it at its next open

    async def _abort_open(self, cap: _Capture, why: str | None) -> None:
        for (kind, layer), f in cap.files.items():
            if f.upload is not None:
                await self._abort(f)
                if why:
                    cap.warnings.append(f"{kind}/{layer} not stored: {why}")

    async def _index(self, cap: _Capture, done: wp.CaptureDone) -> None:
        index = {"pid": cap.pid, "tokens": int(done.tokens), "heads": list(done.heads), "dtype": DTYPE,
                 "layers": {k: sorted(v) for k, v in cap.layers.items()},
                 "warnings": [w[:300] for w in cap.warnings[:MAX_WARNINGS]]}
        try:
            await self.writer.do(ops.Put(f"{capture_dir(cap.pid)}/index.json", json.dumps(index).encode(), cap.user))
        except LLMOSError as exc:
            cap.warnings.append(f"index.json not stored: {exc.message}"[:300])

    def _close(self, cap: _Capture, why: str) -> None:
        cap.closed = True
        cap.warnings.append(why)
        if cap.task is None:
            self._finish(cap)
        else:
            cap.queue.put_nowait(None)  # wakes the task, which aborts what is open

    def _finish(self, cap: _Capture) -> None:
        if self._live.pop(cap.key, None) is None:
            return
        if cap.pid is not None:
            self._by_pid.pop(cap.pid, None)
            self._remember(cap.pid, cap.warnings)
        cap.finished.set()

    def _remember(self, pid: int, warnings: list[str]) -> None:
        self._finished[pid] = [w[:300] for w in warnings[:MAX_WARNINGS]]
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)

    # -- results (wait, stream, close) -----------------------------------------------------------------
    async def complete(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` once its process's capture is stored, with the capture's warnings added. A capture whose
        worker sent nothing before the process ended (KILL, a dead worker) is given up here."""
        pid = result.get("pid") if isinstance(result, dict) else None
        cap = self._by_pid.get(pid)
        if cap is not None:
            if not cap.done and not cap.closed:
                self._close(cap, "nothing captured: the process ended before its worker sent the capture")
            await asyncio.shield(cap.finished.wait())
        warnings = self._finished.get(pid)
        if not warnings:
            return result
        return {**result, "warnings": [*(result.get("warnings") or []), *warnings]}
