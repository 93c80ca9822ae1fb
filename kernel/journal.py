"""The process journal: every LLM process's record in the store, so that a kernel killed with -9 loses nothing.

What is journaled, and when (the ProcessManager calls these; all writes go through the storage Writer,
which groups them into one LMDB transaction per commit, fsynced):

- ``spawned``: the process's record, its prompt and the next pid, committed *before* the spawn is
  acknowledged (the caller awaits the future). An acknowledged pid is never lost, and never reused.
- ``changed``: any state change (``LLMProcess.transition`` calls the table's observer, which calls this),
  new tokens, a renice: the process is marked dirty; dirty records are written together at the next
  checkpoint, ``checkpoint_s`` later (0.25 s by default). A crash loses at most that much of a
  process's output, which its resume regenerates (token-identical for greedy decoding).
- ``reaped``: the record is deleted at the next checkpoint.

Layout (the store's ``journal`` database): ``b"r" + pid`` -> the record (msgpack), ``b"i" + pid`` -> its
prompt token ids (uint32 little-endian, rewritten only when the prompt changes: a session's next turn);
the ``sys`` database's ``next_pid``. ``load()`` reads it all back at start, and
``kernel/recovery.py`` turns the records into processes again.
"""

from __future__ import annotations

import array
import asyncio
import json
import struct
import sys
import time
from typing import Any, Callable

import msgpack

from llmos.kernel.process import LLMProcess, SchedStats, State

_PID = struct.Struct(">Q")
RECORD, PROMPT = b"r", b"i"
NEXT_PID = b"next_pid"
CHECKPOINT_S = 0.25
ERROR_REPORT_S = 60.0  # a failing checkpoint is reported at most this often


def _ids_to_bytes(ids: list[int]) -> bytes:
    a = array.array("I", ids)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def _ids_from_bytes(raw: bytes) -> list[int]:
    a = array.array("I")
    a.frombytes(bytes(raw))
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


# the LLMProcess fields a record carries as they are (the rest are rebuilt or derived)
_PLAIN = ("pid", "owner", "model", "priority", "params", "created", "admitted_at", "first_token_at", "last_token_at",
          "finished_at", "final_text", "finish_reason", "error", "signal", "max_new_tokens", "warnings", "session",
          "deadline_s", "queue_timeout_s", "messages", "transcript", "turn_prefill")


def record_of(proc: LLMProcess) -> dict[str, Any]:
    """The journal record of a process (everything but its prompt, which is kept under its own key)."""
    rec = {k: getattr(proc, k) for k in _PLAIN}
    rec["state"] = proc.state.value
    rec["stopped_from"] = proc.stopped_from.value if proc.stopped_from is not None else None
    rec["token_ids"] = _ids_to_bytes(proc.token_ids)
    rec["text"] = "".join(proc.text_parts)
    s = proc.sched
    rec["sched"] = {"preemptions": s.preemptions, "swaps_out": s.swaps_out, "swaps_in": s.swaps_in,
                    "recomputed_tokens": s.recomputed_tokens, "prefill_tokens": s.prefill_tokens, "turns": s.turns,
                    "time_in_state": dict(s.time_in_state)}
    return rec


def proc_of(rec: dict[str, Any], prompt_ids: list[int]) -> LLMProcess:
    """A process rebuilt from its record (its state as journaled; recovery decides what it becomes)."""
    proc = LLMProcess(rec["pid"], rec["owner"], rec["model"], rec["priority"], dict(rec["params"] or {}),
                      list(prompt_ids))
    for k in _PLAIN[5:]:
        if k in rec:
            setattr(proc, k, rec[k])
    proc.params = dict(rec["params"] or {})
    proc.state = State(rec["state"])
    proc.warnings = list(rec.get("warnings") or [])
    if proc.params.pop("capture", None) is not None and proc.state is not State.ZOMBIE:
        proc.warnings.append("its capture was not resumed after the kernel restarted (what it had captured "
                             "before is lost): captures are not journaled")
    proc.stopped_from = State(rec["stopped_from"]) if rec.get("stopped_from") else None
    proc.token_ids = _ids_from_bytes(rec.get("token_ids") or b"")
    proc.text_parts = [rec["text"]] if rec.get("text") else []
    sched = rec.get("sched") or {}
    proc.sched = SchedStats(**{k: sched[k] for k in ("preemptions", "swaps_out", "swaps_in", "recomputed_tokens",
                                                     "prefill_tokens", "turns") if k in sched},
                            time_in_state=dict(sched.get("time_in_state") or {}))
    return proc


class Journal:
    """The process table's durable copy in the store (``store``, a :class:`llmos.drivers.storage.Store`; writes
    through ``writer``, its :class:`~llmos.drivers.storage.Writer`). Owned by the ProcessManager: every method runs
    in the kernel's event loop; the Writer's thread does the LMDB work."""

    def __init__(self, store: Any, writer: Any, checkpoint_s: float = CHECKPOINT_S) -> None:
        self.store = store
        self.writer = writer
        self.checkpoint_s = checkpoint_s
        self.procs: Callable[[int], LLMProcess | None] = lambda pid: None  # set by the ProcessManager
        self.on_error: Callable[[BaseException], None] = lambda exc: None
        self._dirty: set[int] = set()
        self._reaped: set[int] = set()
        self._prompt_of: dict[int, list[int]] = {}  # pid -> the prompt list last written (identity compared)
        self._timer: asyncio.TimerHandle | None = None
        self._last: Any = None  # the last write submitted (the Writer commits in order)
        self._reported = -ERROR_REPORT_S  # when a failed checkpoint was last reported (monotonic)
        self.next_pid = 1
        self.stats = {"checkpoints": 0, "records": 0, "bytes": 0, "spawns": 0}

    # -- reading (at start) ----------------------------------------------------------------
    def load(self) -> tuple[int, list[LLMProcess]]:
        """(the next pid, every journaled process), read in one transaction."""
        jdb, sdb = self.store.db("journal"), self.store.db("sys")
        procs: list[LLMProcess] = []
        with self.store.read() as txn:
            raw = txn.get(NEXT_PID, db=sdb)
            next_pid = int(msgpack.unpackb(bytes(raw))) if raw is not None else 1
            cur = txn.cursor(db=jdb)
            if cur.set_range(RECORD):
                for key, val in cur:
                    key = bytes(key)
                    if not key.startswith(RECORD):
                        break
                    rec = msgpack.unpackb(bytes(val), raw=False)
                    prompt = txn.get(PROMPT + key[1:], db=jdb)
                    procs.append(proc_of(rec, _ids_from_bytes(prompt) if prompt is not None else []))
        for proc in procs:
            self._prompt_of[proc.pid] = proc.prompt_ids
            next_pid = max(next_pid, proc.pid + 1)
        self.next_pid = next_pid
        return next_pid, procs

    # -- /proc/<pid> (what `llmos fs cat /proc/<pid>/record` reads: the committed record) ----------
    PROC_FILES = ("record", "prompt_ids", "token_ids", "text", "result")

    def _read(self, pid: int) -> tuple[dict[str, Any], list[int]] | None:
        jdb = self.store.db("journal")
        key = _PID.pack(pid)
        with self.store.read() as txn:
            raw = txn.get(RECORD + key, db=jdb)
            if raw is None:
                return None
            rec = msgpack.unpackb(bytes(raw), raw=False)
            prompt = txn.get(PROMPT + key, db=jdb)
            return rec, _ids_from_bytes(prompt) if prompt is not None else []

    def proc_owner(self, pid: int) -> str | None:
        got = self._read(pid)
        return got[0]["owner"] if got else None

    def proc_list(self, pid: int) -> list[str]:
        """The files /proc/<pid> shows (``result`` once it has ended); [] for a pid with no record."""
        got = self._read(pid)
        if got is None:
            return []
        return [n for n in self.PROC_FILES if n != "result" or got[0]["state"] == State.ZOMBIE.value]

    def proc_file(self, pid: int, name: str) -> bytes | None:
        """One /proc/<pid> file as JSON (UTF-8), from the last committed record: ``record`` (the process record:
        state, owner, model, params, times, sched stats), ``prompt_ids``, ``token_ids``, ``text`` (the output so
        far, plain text) and, once it ended, ``result``. None when there is no such file."""
        got = self._read(pid)
        if got is None or name not in self.PROC_FILES:
            return None
        rec, prompt = got
        proc = proc_of(rec, prompt)
        if name == "record":
            body = {k: v for k, v in rec.items() if k not in ("token_ids", "text")}
            body |= {"prompt_tokens": len(prompt), "output_tokens": len(proc.token_ids)}
        elif name == "prompt_ids":
            body = prompt
        elif name == "token_ids":
            body = proc.token_ids
        elif name == "text":
            return proc.text.encode("utf-8", "surrogatepass")
        elif proc.state is State.ZOMBIE:
            body = proc.result()
        else:
            return None
        return json.dumps(body, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")

    # -- writing ---------------------------------------------------------------------------
    def spawned(self, proc: LLMProcess, next_pid: int) -> asyncio.Future:
        """Commit a new process's record, prompt and the next pid now; the future resolves with the pid once
        they are on disk (or fails with the storage's error: ENOSPC, EIO)."""
        self.stats["spawns"] += 1
        self._dirty.discard(proc.pid)
        self.next_pid = max(self.next_pid, next_pid)
        puts = self._puts([proc]) + [(NEXT_PID, msgpack.packb(self.next_pid), "sys")]
        self._last = self.writer.submit(self._op(puts, []))
        fut = asyncio.wrap_future(self._last)
        loop_fut = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future) -> None:
            if loop_fut.done():
                return
            if f.exception() is not None:
                loop_fut.set_exception(f.exception())
            else:
                loop_fut.set_result(proc.pid)
        fut.add_done_callback(done)
        return loop_fut

    def changed(self, proc: LLMProcess) -> None:
        """Mark a process dirty: its record is written at the next checkpoint, or at once (in the next commit the
        Writer groups) when it has just ended: a result (or a session's reply) its client may already have is not left to a timer."""
        self._dirty.add(proc.pid)
        self._arm(soon=proc.state in (State.ZOMBIE, State.BLOCKED))

    def reaped(self, pid: int) -> None:
        self._dirty.discard(pid)
        self._reaped.add(pid)
        self._prompt_of.pop(pid, None)
        self._arm()

    def flush(self) -> Any:
        """Write every dirty record and delete every reaped one, in one Writer op: a concurrent Future resolved
        once that (and every earlier journal write) is committed, or None when nothing is in flight."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        procs = [p for p in (self.procs(pid) for pid in sorted(self._dirty)) if p is not None]
        gone = sorted(self._reaped)
        self._dirty.clear()
        self._reaped.clear()
        if not procs and not gone:  # nothing new: the last write still in flight, if any (commits are in order)
            return self._last if self._last is not None and not self._last.done() else None
        self.stats["checkpoints"] += 1
        fut = self._last = self.writer.submit(self._op(self._puts(procs), gone))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a shutdown's last flush): nothing to retry with
            return fut
        pids = [p.pid for p in procs]
        # the Writer's thread completes the future: the journal's state is touched back on the loop only
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(self._checked, f, pids, gone))
        return fut

    def _checked(self, fut: Any, pids: list[int], gone: list[int]) -> None:
        """A checkpoint that failed (a full disk: ENOSPC) is tried again at the next one (its records marked dirty
        again, its deletions kept), and reported at most once a minute."""
        exc = fut.exception()
        if exc is None:
            return
        self.stats["failed"] = self.stats.get("failed", 0) + 1
        self._dirty.update(p for p in pids if p not in self._reaped)
        self._reaped.update(gone)
        for pid in pids:
            self._prompt_of.pop(pid, None)  # its prompt may not have been written either
        self._arm()
        if time.monotonic() - self._reported >= ERROR_REPORT_S:
            self._reported = time.monotonic()
            self.on_error(exc)

    def _arm(self, soon: bool = False) -> None:
        if self._timer is not None and not soon:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(0.0 if soon else self.checkpoint_s, self.flush)

    def _puts(self, procs: list[LLMProcess]) -> list[tuple[bytes, bytes, str]]:
        puts = []
        for proc in procs:
            key = _PID.pack(proc.pid)
            val = msgpack.packb(record_of(proc), use_bin_type=True)
            puts.append((RECORD + key, val, "journal"))
            if self._prompt_of.get(proc.pid) is not proc.prompt_ids:
                self._prompt_of[proc.pid] = proc.prompt_ids
                puts.append((PROMPT + key, _ids_to_bytes(proc.prompt_ids), "journal"))
            self.stats["records"] += 1
            self.stats["bytes"] += len(val)
        return puts

    def _op(self, puts: list[tuple[bytes, bytes, str]], gone: list[int]) -> Any:
        from llmos.drivers.storage.ops import Call

        store = self.store

        def apply(txn: Any) -> None:
            dbs = {"journal": store.db("journal"), "sys": store.db("sys")}
            for key, val, db in puts:
                txn.put(key, val, db=dbs[db])
            for pid in gone:
                key = _PID.pack(pid)
                txn.delete(RECORD + key, db=dbs["journal"])
                txn.delete(PROMPT + key, db=dbs["journal"])
        return Call(apply)

    def close(self) -> None:
        """Write what is dirty (at shutdown): waits for the commit."""
        fut = self.flush()
        if fut is not None:
            try:
                fut.result(timeout=30)
            except Exception:
                pass

