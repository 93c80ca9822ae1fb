"""The ProcessManager actor: owns the process table and the run queues, and applies signals.

Every state change of every LLM process happens here, one message at a time. Executors
report tokens with ``StepEvents``; syscall handlers ask for spawn, wait, kill, ps, stat and
stream subscriptions. ZOMBIEs nobody waits for are reaped by the retention policy
(kernel/retention.py) when a process finishes and on a periodic ``Tick``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import msgpack

from llmos.drivers.memory import blocks_for
from llmos.kernel import messages as m
from llmos.kernel.actor import Actor, ActorStopped
from llmos.kernel.config import KernelConfig
from llmos.kernel.process import LLMProcess, ProcessTable, State
from llmos.kernel.retention import Zombie, to_reap
from llmos.kernel.scheduler import RunQueue, admit
from llmos.syscalls import protocol
from llmos.syscalls.errors import DeviceError, Errno, NotPermitted, wire_error

END = object()  # put on a stream queue after the final chunk


class FinishedStats:
    """Timings of the last N finished processes, for the metrics syscall (bounded memory)."""

    KEYS = ("queue_time_s", "ttft_s", "tpot_s", "total_time_s")

    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self.rows: list[dict] = []
        self.count = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.reasons: dict[str, int] = {}

    def add(self, stats: dict, reason: str) -> None:
        self.count += 1
        self.tokens_in += stats["prompt_tokens"]
        self.tokens_out += stats["output_tokens"]
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.rows.append(stats)
        if len(self.rows) > self.keep:
            del self.rows[: len(self.rows) - self.keep]

    def summary(self) -> dict:
        out: dict = {"count": self.count, "tokens_in": self.tokens_in, "tokens_out": self.tokens_out,
                     "finish_reasons": dict(self.reasons)}
        for key in self.KEYS:
            vals = sorted(r[key] for r in self.rows if r.get(key) is not None)
            if vals:
                out[key] = {"mean": sum(vals) / len(vals), "p50": vals[len(vals) // 2],
                            "p95": vals[min(len(vals) - 1, int(len(vals) * 0.95))], "max": vals[-1]}
        return out


# What a list of records in one reply may take, leaving room for the rest of the reply.
RECORDS_BUDGET_BYTES = protocol.MAX_FRAME_BYTES - (1 << 20)


def fit_records(records: list[dict], budget: int = RECORDS_BUDGET_BYTES) -> tuple[list[dict], int]:
    """The records that fit ``budget`` bytes as MessagePack, in order, and how many were left out."""
    kept: list[dict] = []
    used = omitted = 0
    for rec in records:
        size = len(msgpack.packb(rec, use_bin_type=True, default=str))
        if used + size > budget:
            omitted += 1
        else:
            kept.append(rec)
            used += size
    return kept, omitted


class ProcessManager(Actor):
    def __init__(self, config: KernelConfig | None = None, clock: Callable[[], float] = time.time,
                 tick_s: float | None = None) -> None:
        """``clock`` gives the time of finishes and retention (tests pass a fake one); a ``Tick``
        every ``tick_s`` seconds (default: half the retention period, 0.1..10 s; 0 for none)
        reaps expired ZOMBIEs."""
        super().__init__("procman")
        self.config = config or KernelConfig()
        self.clock = clock
        self.tick_s = min(max(self.config.zombie_ttl_s / 2, 0.1), 10.0) if tick_s is None else tick_s
        self._ticker: asyncio.Task | None = None
        self.table = ProcessTable()
        self.executors: dict[str, Any] = {}  # executor id -> Executor actor
        self.queues: dict[str, RunQueue] = {}  # executor id -> its READY processes
        self.placement: dict[int, str] = {}  # pid -> executor id (until ZOMBIE)
        self.running: dict[str, set[int]] = {}  # executor id -> pids in its batch
        self.waiters: dict[int, list[tuple[asyncio.Future, bool]]] = {}
        self.subscribers: dict[int, list[asyncio.Queue]] = {}
        self.finished = FinishedStats()

    def start(self) -> "ProcessManager":
        super().start()
        if self.tick_s > 0:
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="procman:tick")
        return self

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.tell(m.Tick())
            except ActorStopped:
                return

    async def on_stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()

    async def receive(self, msg: Any) -> Any:
        handler = getattr(self, "on_" + type(msg).__name__, None)
        if handler is None:
            raise TypeError(f"procman cannot handle {type(msg).__name__}")
        return handler(msg)

    # -- syscalls --------------------------------------------------------------------------
    def on_Spawn(self, msg: m.Spawn) -> int:
        live = [e for e in msg.executors if not e.dead]
        if not live:
            raise DeviceError(f"every instance of model {msg.model} has stopped")
        for e in live:
            self.executors[e.id] = e
            self.queues.setdefault(e.id, RunQueue())
            self.running.setdefault(e.id, set())
        ex = min(live, key=lambda e: len(self.running[e.id]) + len(self.queues[e.id]))
        proc = self.table.create(owner=msg.owner, model=msg.model, priority=msg.priority,
                                 params=msg.params, prompt_ids=msg.prompt_ids)
        proc.limit_output(_context_len(ex))
        self.placement[proc.pid] = ex.id
        proc.transition(State.READY)
        self.queues[ex.id].push(proc.pid, proc.priority)
        self.log.info("spawn", pid=proc.pid, owner=proc.owner, model=proc.model, priority=proc.priority,
                      prompt_tokens=len(proc.prompt_ids))
        self._schedule(ex.id)
        return proc.pid

    def on_Wait(self, msg: m.Wait) -> asyncio.Future:
        proc = self._owned(msg.pid, msg.owner)
        fut = asyncio.get_running_loop().create_future()
        if proc.state is State.ZOMBIE:
            fut.set_result(proc.result())
            if msg.reap:
                self._reap(proc.pid)
        else:
            self.waiters.setdefault(proc.pid, []).append((fut, msg.reap))
        return fut

    def on_CancelWait(self, msg: m.CancelWait) -> None:
        lst = [(f, r) for f, r in self.waiters.get(msg.pid, []) if f is not msg.future]
        if lst:
            self.waiters[msg.pid] = lst
        else:
            self.waiters.pop(msg.pid, None)

    def on_Kill(self, msg: m.Kill) -> dict:
        proc = self._owned(msg.pid, msg.owner)
        if proc.state is State.ZOMBIE:
            return {"pid": proc.pid, "state": proc.state.value}
        proc.signal = msg.signal
        ex_id = self.placement.get(proc.pid)
        if proc.state in (State.NEW, State.READY):
            if ex_id:
                self.queues[ex_id].remove(proc.pid)
            self._finish(proc, "killed")
        elif msg.signal == "KILL":
            self._abort_on_worker(proc.pid, ex_id)
            self._finish(proc, "killed")
        else:  # TERM on a running process: the worker flushes what it has, then reports "killed"
            self._abort_on_worker(proc.pid, ex_id)
        self.log.info("signal", pid=proc.pid, signal=msg.signal, state=proc.state.value)
        return {"pid": proc.pid, "state": proc.state.value}

    def on_Ps(self, msg: m.Ps) -> dict:
        kept, omitted = fit_records([p.record() for p in self.table])
        return {"processes": kept, "omitted": omitted}

    def on_Stat(self, msg: m.Stat) -> dict:
        proc = self.table.get(msg.pid)
        return {**proc.record(), "text": proc.text, "stats": proc.stats()}

    def on_Counts(self, msg: m.Counts) -> dict:
        return self.table.counts()

    def on_Live(self, msg: m.Live) -> dict[str, int]:
        return {ex_id: len(self.running.get(ex_id, ())) + len(q) for ex_id, q in self.queues.items()}

    def on_Metrics(self, msg: m.Metrics) -> dict:
        live = [p.record() | {"stats": p.stats()} for p in self.table if p.state is not State.ZOMBIE]
        kept, omitted = fit_records(live)
        return {"processes": kept, "omitted": omitted, "finished": self.finished.summary(),
                "counts": self.table.counts()}

    def on_Tick(self, msg: m.Tick) -> None:
        self._reap_expired()

    def on_Subscribe(self, msg: m.Subscribe) -> asyncio.Queue:
        proc = self._owned(msg.pid, msg.owner)
        q: asyncio.Queue = asyncio.Queue()
        if proc.token_ids or proc.text_parts:
            q.put_nowait({"text": "".join(proc.text_parts), "token_ids": list(proc.token_ids)})
        if proc.state is State.ZOMBIE:
            q.put_nowait((END, proc.result()))
        else:
            self.subscribers.setdefault(proc.pid, []).append(q)
        return q

    def on_Unsubscribe(self, msg: m.Unsubscribe) -> None:
        lst = self.subscribers.get(msg.pid)
        if lst and msg.queue in lst:
            lst.remove(msg.queue)

    # -- executor events -------------------------------------------------------------------
    def on_StepEvents(self, msg: m.StepEvents) -> None:
        now = time.time()
        for pid, token_ids, text, reason, final_text, error in msg.events:
            try:
                proc = self.table.get(pid)
            except Exception:
                continue  # killed and reaped meanwhile
            if proc.state is not State.RUNNING:
                continue  # e.g. KILLed: the worker's late tokens are dropped
            if token_ids:
                if proc.first_token_at is None:
                    proc.first_token_at = now
                proc.last_token_at = now
                proc.token_ids.extend(token_ids)
            if text:
                proc.text_parts.append(text)
            if token_ids or text:
                for q in self.subscribers.get(pid, []):
                    q.put_nowait({"text": text, "token_ids": list(token_ids)})
            if reason is not None:
                self._finish(proc, reason, final_text, error)
        self._schedule(msg.executor)

    def on_WorkerDied(self, msg: m.WorkerDied) -> None:
        err = wire_error(Errno.EIO, msg.message)
        for pid in list(self.running.get(msg.executor, set())) + self.queues.get(msg.executor, RunQueue()).order():
            proc = self.table.get(pid)
            if proc.state is not State.ZOMBIE:
                self._finish(proc, "error", error=err)
        self.executors.pop(msg.executor, None)
        self.queues.pop(msg.executor, None)
        self.running.pop(msg.executor, None)

    # -- internals -------------------------------------------------------------------------
    def _owned(self, pid: int, owner: str) -> LLMProcess:
        proc = self.table.get(pid)
        if owner != proc.owner and owner != "root":
            raise NotPermitted(f"process {pid} belongs to {proc.owner}, not {owner}")
        return proc

    def _schedule(self, ex_id: str) -> None:
        ex = self.executors.get(ex_id)
        if ex is None or ex.dead or getattr(ex, "alive", True) is False:
            return
        if not self.queues[ex_id]:
            return  # nothing waits (the common case on every step)
        running = self.running[ex_id]
        total, bs = ex.kv_total, ex.kv_block_size
        # admit only what the KV pool can hold now: every running context plus the new prompt
        held = [sum(blocks_for(len(self.table.get(p).prompt_ids) + len(self.table.get(p).token_ids) + 1, bs)
                    for p in running), len(running)]  # blocks held, processes holding them

        def fits(pid: int) -> bool:
            need = blocks_for(len(self.table.get(pid).prompt_ids) + 1, bs)
            if total and held[1] and held[0] + need > total:
                return False  # an idle pool always takes one process, so nothing waits forever
            held[0] += need
            held[1] += 1
            return True

        admitted = admit(self.queues[ex_id], ex.max_batch - len(running), fits)
        for i, pid in enumerate(admitted):
            proc = self.table.get(pid)
            try:
                ex.tell(m.Add(pid, proc.prompt_ids, proc.params, proc.owner, proc.priority))
            except ActorStopped:  # the executor is going away: back to the queue; its WorkerDied ends them
                for rest in admitted[i:]:
                    self.queues[ex_id].push(rest, self.table.get(rest).priority)
                return
            proc.transition(State.RUNNING)
            proc.admitted_at = time.time()
            running.add(pid)

    def _abort_on_worker(self, pid: int, ex_id: str | None) -> None:
        ex = self.executors.get(ex_id) if ex_id else None
        if ex is not None and not ex.dead:
            try:
                ex.tell(m.Abort(pid))
            except ActorStopped:
                pass

    def _finish(self, proc: LLMProcess, reason: str, final_text: str | None = None,
                error: dict | None = None) -> None:
        proc.transition(State.ZOMBIE)
        proc.finished_at = self.clock()
        proc.finish_reason = reason
        proc.error = error
        if final_text is not None:
            proc.final_text = final_text
        ex_id = self.placement.pop(proc.pid, None)
        if ex_id and ex_id in self.running:
            self.running[ex_id].discard(proc.pid)
            self._schedule(ex_id)
        result = proc.result()
        self.finished.add(result["stats"], reason)
        self.log.info("exit", pid=proc.pid, reason=reason, output_tokens=len(proc.token_ids),
                      **({"error": error["message"]} if error else {}))
        for q in self.subscribers.pop(proc.pid, []):
            q.put_nowait((END, result))
        reap = False
        for fut, r in self.waiters.pop(proc.pid, []):
            if not fut.done():
                fut.set_result(result)
                reap = reap or r
        if reap:
            self._reap(proc.pid)
        else:
            self._reap_expired(proc.owner)

    def _reap(self, pid: int) -> None:
        self.table.reap(pid)
        self.subscribers.pop(pid, None)

    def _reap_expired(self, owner: str | None = None) -> None:
        """Apply the retention policy to every ZOMBIE (or to one owner's, when a process of theirs finished)."""
        zombies = [Zombie(p.pid, p.owner, p.finished_at or 0.0, bool(self.waiters.get(p.pid) or
                                                                     self.subscribers.get(p.pid)))
                   for p in self.table if p.state is State.ZOMBIE and (owner is None or p.owner == owner)]
        if not zombies:
            return
        pids = to_reap(zombies, self.clock(), self.config.zombie_ttl_s, self.config.max_zombies)
        for pid in pids:
            self._reap(pid)
        if pids:
            self.log.info("reaped", count=len(pids), pids=pids[:20], owner=owner)


def _context_len(executor: Any) -> int | None:
    info = getattr(executor, "info", None) or {}
    return int(info["context_len"]) if info.get("context_len") else None
