"""The ProcessManager actor: owns the process table, the run queues and the instances' batches; applies signals.

Every state change of every LLM process happens here, one message at a time. The decisions
of what runs are ``kernel/scheduler.decide``'s (pure); this actor builds its inputs, applies
its plan by telling executors the worker protocol's ops (``drivers/model/protocol.py``), and
moves processes by what the engines report (``StepEvents``: tokens, finishes, preemptions).
Times come from the injected ``clock`` (monotonic seconds), so tests drive aging, quanta,
deadlines and retention step by step.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from llmos.drivers.model import protocol as wp
from llmos.kernel import messages as m
from llmos.kernel.actor import Actor, ActorStopped
from llmos.kernel.config import KernelConfig, quotas_of
from llmos.kernel.process import KV_DEVICE, KV_NONE, KV_SWAP, LLMProcess, ProcessTable, State
from llmos.kernel.quota import Timers
from llmos.kernel.accounting import FinishedStats, fit_records
from llmos.kernel.instance import Instance, context_len
from llmos.kernel.journal import Journal
from llmos.kernel.retention import Zombie, to_reap
from llmos.kernel.recovery import RecoveryMixin
from llmos.kernel.sessions import SessionsMixin
from llmos.kernel.scheduler import Plan, SchedParams, Task, decide, level, queue_key
from llmos.syscalls.errors import Busy, DeviceError, Errno, InvalidArgument, NotPermitted, wire_error

END = m.END  # the stream queues' end marker


class ProcessManager(SessionsMixin, RecoveryMixin, Actor):
    def __init__(self, config: KernelConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 tick_s: float | None = None, admins: frozenset[str] = frozenset({"root"}),
                 journal: Journal | None = None) -> None:
        """``clock``: monotonic seconds for every duration (aging, quanta, deadlines, retention); tests pass
        a fake one and send ``Tick`` themselves (``tick_s=0``: no ticker). ``admins``: the users who may
        signal anyone's processes and set negative nice values. ``journal``: the process journal in the store;
        its processes are restored now (finished ones with their results, unfinished ones waiting for an
        instance of their model: ``orphan_models``)."""
        super().__init__("procman")
        self.config = config or KernelConfig()
        self.clock = clock
        self.admins = admins
        self.sched = SchedParams(self.config.sched_policy, self.config.aging_s, self.config.quantum_tokens)
        self.quotas = quotas_of(self.config)
        self.tick_s = min(max(self.config.zombie_ttl_s / 2, 0.1), 10.0) if tick_s is None else tick_s
        self._ticker: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.journal = journal
        self.table = ProcessTable(journal.changed if journal is not None else None)
        # model path -> processes waiting for an instance of it: their worker crashed (a new one is starting), or
        # the kernel restarted and the model is loading. Not placed, not in any run queue until adopted.
        self.orphans: dict[str, set[int]] = {}
        self.suspended = False  # the kernel is stopping: retired workers' processes are kept, not ended
        self.instances: dict[str, Instance] = {}
        self.where: dict[int, Instance] = {}  # pid -> the instance it is placed on (until ZOMBIE)
        self.waiters: dict[int, list[tuple[asyncio.Future, bool]]] = {}
        self.subscribers: dict[int, list[asyncio.Queue]] = {}
        self.timers = Timers()
        self.finished = FinishedStats()
        self.turn_pending: set[int] = set()  # sessions whose write is being encoded
        self.turn_writes: dict[int, dict] = {}  # those writes ({role, content}), joined to the history at StartTurn
        # STOPPED processes that CONT returns to a run queue: they count against --max-queue, so that
        # STOP, spawn, CONT cannot grow the queue past its bound
        self.stopped_runnable = 0
        self.live_of: dict[str, int] = {}  # user -> its processes not yet ZOMBIE (the per-user process quota)
        self._kv_capped = self.quotas.default.max_kv_blocks is not None or any(
            u.max_kv_blocks is not None for u in self.quotas.users.values())
        if journal is not None:
            journal.procs = self._lookup
            journal.on_error = lambda exc: self.log.error("journal_write_failed", error=str(exc),
                                                          failures=journal.stats.get("failed", 0))
            self._restore(*journal.load())

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
        if self._timer is not None:
            self._timer.cancel()

    async def receive(self, msg: Any) -> Any:
        match msg:
            case m.Spawn():
                return self._durable(self.spawn(msg))
            case m.SpawnFailed():
                proc = self._lookup(msg.pid)
                if proc is not None and proc.state is not State.ZOMBIE:
                    if proc.in_engine:
                        self._tell(self.where.get(proc.pid), wp.Abort(proc.pid))
                    self._finish(proc, "error", error=msg.error)
                return None
            case m.Checkpoint():
                fut = self.journal.flush() if self.journal is not None else None
                return asyncio.wrap_future(fut) if fut is not None else None
            case m.Suspend():
                self.suspended = True
                return None
            case m.ModelGone():
                return self.model_gone(msg)
            case m.Wait():
                return self.wait(msg.pid, msg.user, msg.reap)
            case m.CancelWait():
                return self.cancel_wait(msg)
            case m.Kill():
                return self.kill(msg.pid, msg.signal, msg.user)
            case m.Nice():
                return self.nice(msg.pid, msg.priority, msg.user)
            case m.PrepareTurn():
                return self.prepare_turn(msg)
            case m.StartTurn():
                return self.start_turn(msg)
            case m.CancelTurn():
                self.turn_pending.discard(msg.pid)
                self.turn_writes.pop(msg.pid, None)
                return None
            case m.Close():
                return self.close(msg.pid, msg.user)
            case m.Ps():
                kept, omitted = fit_records([p.record() for p in self.table])
                return {"processes": kept, "omitted": omitted}
            case m.Owner():
                return self.table.get(msg.pid).owner
            case m.Stat():
                proc = self._owned(msg.pid, msg.user)
                return {**proc.record(), "text": proc.text, "stats": proc.stats(), "sched": proc.sched.to_wire()}
            case m.Counts():
                return self.table.counts()
            case m.Live():
                return {i.id: len(i.placed) for i in self.instances.values()}
            case m.Metrics():
                live = [p.record() | {"stats": p.stats(), "sched": p.sched.to_wire()}
                        for p in self.table if p.state is not State.ZOMBIE]
                kept, omitted = fit_records(live)
                return {"processes": kept, "omitted": omitted, "finished": self.finished.summary(),
                        "counts": self.table.counts(), "totals": self.finished.totals()}
            case m.Tick():
                return self.tick()
            case m.Subscribe():
                return self.subscribe(msg.pid, msg.user)
            case m.Unsubscribe():
                lst = self.subscribers.get(msg.pid)
                if lst and msg.queue in lst:
                    lst.remove(msg.queue)
                return None
            case m.ExecutorReady():
                inst = self.instances.get(msg.executor)
                if inst is None:
                    inst = self.instances[msg.executor] = Instance(msg.executor, msg.ref, dict(msg.info))
                    self._adopt(inst, getattr(msg.ref, "model_path", None))
                else:  # a new description of a known instance (its measurements)
                    inst.info = dict(msg.info)
                return None
            case m.StepEvents():
                return self.step_events(msg)
            case m.WorkerDied():
                return self.worker_died(msg)
        raise TypeError(f"procman cannot handle {type(msg).__name__}")

    # -- syscalls --------------------------------------------------------------------------
    def spawn(self, msg: m.Spawn) -> int:
        now = self.clock()
        if msg.priority < 0 and msg.user not in self.admins:
            raise NotPermitted(f"only the admin may run a process at a negative nice value ({msg.priority}); "
                               "use 0..19")
        live = [self.instances[e.id] for e in msg.executors if e.id in self.instances and not self.instances[e.id].dead]
        if not live:
            raise DeviceError(f"every instance of model {msg.model} has stopped")
        queued = sum(len(i.queue) for i in self.instances.values()) + self.stopped_runnable
        if queued >= self.config.max_queue:
            raise Busy(f"the run queue is full ({queued} processes wait; the limit is {self.config.max_queue}): "
                       "retry in a few seconds, once some have run")
        inst = min(live, key=lambda i: len(i.running) + len(i.queue))
        self.quotas.check_start(msg.user, self.live_of.get(msg.user, 0), len(msg.prompt_ids),
                                wp.blocks_for(len(msg.prompt_ids) + 1, inst.block_size), now)
        proc = self.table.create(owner=msg.user, model=msg.model, priority=msg.priority, params=msg.params,
                                 prompt_ids=msg.prompt_ids, session=msg.session)
        proc.arrival = proc.state_since = now
        self.live_of[proc.owner] = self.live_of.get(proc.owner, 0) + 1
        proc.block_size = inst.block_size
        proc.deadline_s, proc.queue_timeout_s = msg.deadline, msg.queue_timeout
        proc.limit_output(context_len(inst.info))
        self.quotas.use_tokens(msg.user, len(msg.prompt_ids), now)
        inst.placed.add(proc.pid)
        self.where[proc.pid] = inst
        if msg.session:
            proc.messages = list(msg.messages) if msg.messages is not None else (
                [] if inst.info.get("has_chat_template") and msg.prompt is None else None)
            proc.transcript = msg.prompt if proc.messages is None else None
            if proc.transcript is None and proc.messages is None:
                proc.transcript = ""
        self.log.info("spawn", pid=proc.pid, owner=proc.owner, model=proc.model, priority=proc.priority,
                      prompt_tokens=len(proc.prompt_ids), session=msg.session)
        first_turn = bool(proc.prompt_ids) and (not msg.session or proc.messages is None or
                                                (proc.messages and proc.messages[-1].get("role") == "user"))
        if not first_turn:
            proc.transition(State.BLOCKED, now)
            return proc.pid
        self._begin_turn(proc, now)
        proc.transition(State.READY, now)
        self._enqueue(inst, proc, now)
        if proc.queue_timeout_s is not None:
            self._arm(proc.pid, "queue", now + proc.queue_timeout_s)
        self._schedule(inst)
        return proc.pid

    def wait(self, pid: int, user: str, reap: bool) -> asyncio.Future:
        proc = self._owned(pid, user)
        fut = asyncio.get_running_loop().create_future()
        if proc.state is State.ZOMBIE:
            fut.set_result(proc.result())
            if reap:
                self._reap(proc.pid)
        else:
            self.waiters.setdefault(proc.pid, []).append((fut, reap))
        return fut

    def cancel_wait(self, msg: m.CancelWait) -> None:
        lst = [(f, r) for f, r in self.waiters.get(msg.pid, []) if f is not msg.future]
        if lst:
            self.waiters[msg.pid] = lst
        else:
            self.waiters.pop(msg.pid, None)

    def kill(self, pid: int, signal: str, user: str) -> dict:
        proc = self._owned(pid, user)
        now = self.clock()
        if proc.state is State.ZOMBIE:
            if signal in ("STOP", "CONT"):
                raise InvalidArgument(_ended(proc, signal))
            return {"pid": proc.pid, "state": proc.state.value}
        inst = self.where.get(pid)
        if signal == "STOP":
            self._stop(proc, inst, now)
        elif signal == "CONT":
            self._cont(proc, inst, now)
        else:
            proc.signal = signal
            if proc.state is State.RUNNING and signal == "TERM":
                self._tell(inst, wp.Abort(pid))  # the worker flushes what it has, then reports "killed"
            else:
                if proc.in_engine:
                    self._tell(inst, wp.Abort(pid))
                self._finish(proc, "killed")
        self.log.info("signal", pid=proc.pid, signal=signal, state=proc.state.value)
        return {"pid": proc.pid, "state": proc.state.value}

    def nice(self, pid: int, priority: int, user: str) -> dict:
        proc = self._owned(pid, user)
        if priority < 0 and user not in self.admins:
            raise NotPermitted(f"only the admin may set a negative nice value ({priority}); use 0..19")
        if proc.state is State.ZOMBIE:
            raise InvalidArgument(_ended(proc, "nice"))
        if proc.state is not State.ZOMBIE:
            now = self.clock()
            proc.priority = priority
            if proc.state is State.RUNNING:
                proc.admitted_level = float(priority)  # it ranks by its new value from now on
            inst = self.where.get(pid)
            if self.journal is not None:
                self.journal.changed(proc)
            if inst is not None:
                if proc.state is State.READY:
                    self._enqueue(inst, proc, now, requeue=True)
                if proc.in_engine:
                    self._tell(inst, wp.Renice(pid, priority))
                self._schedule(inst)
            self.log.info("renice", pid=pid, priority=priority)
        return {"pid": pid, "priority": proc.priority, "state": proc.state.value}

    def close(self, pid: int, user: str) -> asyncio.Future:
        """End a session now (finish reason ``closed``), or any other process as TERM would; the future
        resolves with its result and the process is reaped."""
        proc = self._owned(pid, user)
        fut = self.wait(pid, user, reap=True)
        if proc.state is not State.ZOMBIE:
            if proc.session:
                if proc.in_engine:
                    self._tell(self.where.get(pid), wp.Abort(pid))
                self._finish(proc, "closed")
            else:
                self.kill(pid, "TERM", user)
        return fut

    def subscribe(self, pid: int, user: str) -> asyncio.Queue:
        proc = self._owned(pid, user)
        q: asyncio.Queue = asyncio.Queue()
        if proc.token_ids or proc.text_parts:
            q.put_nowait({"text": "".join(proc.text_parts), "token_ids": list(proc.token_ids)})
        if proc.state is State.ZOMBIE:
            q.put_nowait((END, proc.result()))
        elif proc.state is State.BLOCKED:
            q.put_nowait((END, self._turn_result(proc)))
        else:
            self.subscribers.setdefault(proc.pid, []).append(q)
        return q

    # -- executor events -------------------------------------------------------------------
    def step_events(self, msg: m.StepEvents) -> None:
        inst = self.instances.get(msg.executor)
        if inst is None:
            return
        if msg.stats:
            inst.stats = msg.stats
        now = self.clock()
        wall = time.time()
        for ev in msg.events:
            try:
                proc = self.table.get(ev.pid)
            except Exception:
                continue  # killed and reaped meanwhile
            if proc.state is State.ZOMBIE:
                continue  # e.g. KILLed: the worker's late tokens are dropped
            if ev.prefilled:
                proc.sched.prefill_tokens += ev.prefilled
                proc.turn_prefill += ev.prefilled
            if ev.token_ids:
                if proc.first_token_at is None:
                    proc.first_token_at = wall
                proc.last_token_at = wall
                proc.token_ids.extend(ev.token_ids)
                proc.run_tokens += len(ev.token_ids)
                if self.journal is not None:
                    self.journal.changed(proc)  # a checkpoint of its tokens
                self.quotas.use_tokens(proc.owner, len(ev.token_ids), now)
            if ev.text:
                proc.text_parts.append(ev.text)
            if ev.token_ids or ev.text:
                for q in self.subscribers.get(ev.pid, []):
                    q.put_nowait({"text": ev.text, "token_ids": list(ev.token_ids)})
            if ev.preempted is not None:
                self._preempted(proc, inst, ev, now)
            if ev.finish_reason is not None:
                if proc.session and ev.finish_reason in ("stop", "length") and proc.state is State.RUNNING:
                    self._end_turn(proc, ev.finish_reason, ev.final_text, now)
                else:
                    self._finish(proc, ev.finish_reason, ev.final_text, ev.error)
        self._schedule(inst)

    def _preempted(self, proc: LLMProcess, inst: Instance, ev: wp.StepEvent, now: float) -> None:
        """The engine took a sequence off the device (asked, or forced by memory pressure): record where its
        KV went; a RUNNING one (forced) goes back to the run queue."""
        proc.sched.recomputed_tokens += ev.recomputed
        proc.sched.swaps_out += ev.preempted == "swap"
        if proc.preempts_pending > 0:  # the answer to a Preempt the kernel sent
            proc.preempts_pending -= 1
            # (RUNNING: a Resume followed it, the KV is back; "none": its KV had already left the pool)
            if proc.state is not State.RUNNING and ev.preempted != "none":
                proc.kv = KV_SWAP if ev.preempted == "swap" else KV_NONE
            return
        if ev.preempted == "none":
            return
        proc.kv = KV_SWAP if ev.preempted == "swap" else KV_NONE
        if proc.state is State.RUNNING:  # forced by memory pressure
            proc.sched.preemptions += 1
            inst.running.discard(proc.pid)
            proc.transition(State.READY, now)
            self._enqueue(inst, proc, now)
            self.log.info("preempted", pid=proc.pid, mode=ev.preempted, by="memory")

    def tick(self) -> None:
        """Timers that are due (deadlines, queue timeouts), then zombie retention."""
        now = self.clock()
        for pid, kind in self.timers.due(now):
            try:
                proc = self.table.get(pid)
            except Exception:
                continue
            if proc.state is State.ZOMBIE or (kind == "queue" and proc.admitted_at is not None):
                continue
            what = (f"its queue timeout of {proc.queue_timeout_s} s passed before it ran" if kind == "queue" else
                    f"its deadline of {proc.deadline_s} s passed")
            if proc.in_engine:
                self._tell(self.where.get(pid), wp.Abort(pid))
            self._finish(proc, "error", error=wire_error(Errno.ETIMEDOUT, f"process {pid} ended: {what}; "
                                                                         "its partial output is kept"))
        self._reap_expired()
        self._rearm()

    # -- internals -------------------------------------------------------------------------
    def _owned(self, pid: int, user: str) -> LLMProcess:
        """The process, when ``user`` owns it or is an admin; NotPermitted (EPERM) otherwise."""
        proc = self.table.get(pid)
        if user != proc.owner and user not in self.admins:
            raise NotPermitted(f"process {pid} belongs to {proc.owner}, not {user}")
        return proc

    def _tell(self, inst: Instance | None, msg: Any) -> bool:
        if inst is None or inst.dead:
            return False
        try:
            inst.ref.tell(msg)
            return True
        except ActorStopped:  # the executor is going away; its WorkerDied ends what it held
            return False

    def _enqueue(self, inst: Instance, proc: LLMProcess, now: float, requeue: bool = False) -> None:
        """Put a READY process in its instance's run queue, its key carrying the wait it already earned."""
        if not requeue:
            proc.state_since = now
        waited = proc.waited_s + (now - proc.state_since if requeue else 0.0)
        inst.queue.push(proc.pid, queue_key(self.sched, proc.priority, now, waited, proc.arrival))

    def _stop(self, proc: LLMProcess, inst: Instance | None, now: float) -> None:
        if proc.state is State.STOPPED:
            return
        proc.stopped_from = State.BLOCKED if proc.state is State.BLOCKED else State.READY
        self.stopped_runnable += proc.stopped_from is State.READY
        if inst is not None:
            if proc.state is State.RUNNING:
                inst.running.discard(proc.pid)
                proc.sched.preemptions += 1
            elif proc.state is State.READY:
                proc.waited_s += now - proc.state_since
                inst.queue.remove(proc.pid)
            if proc.in_engine:
                inst.parked.add(proc.pid)
                if proc.kv == KV_DEVICE:
                    self._switch_out(inst, proc, "swap")
        proc.transition(State.STOPPED, now)
        if inst is not None:
            self._schedule(inst)

    def _cont(self, proc: LLMProcess, inst: Instance | None, now: float) -> None:
        if proc.state is not State.STOPPED:
            return
        self.stopped_runnable -= proc.stopped_from is State.READY
        if proc.stopped_from is State.BLOCKED:
            proc.transition(State.BLOCKED, now)
            return
        if inst is not None:
            inst.parked.discard(proc.pid)
        proc.transition(State.READY, now)
        if inst is not None:
            self._enqueue(inst, proc, now)
            self._schedule(inst)

    def _switch_out(self, inst: Instance, proc: LLMProcess, mode: str) -> None:
        proc.kv = KV_SWAP if mode == "swap" else KV_NONE  # as planned; the engine's answer says what it did
        if self._tell(inst, wp.Preempt(proc.pid, mode)):
            proc.preempts_pending += 1

    def _view(self, proc: LLMProcess, now: float, inst: Instance) -> Task:
        if proc.state is State.READY:
            lvl = level(self.sched, inst.queue.key(proc.pid), now)
        else:
            lvl = proc.admitted_level
        return Task(proc.pid, proc.owner, proc.priority, proc.context_tokens, proc.kv_blocks, lvl, proc.run_tokens)

    def _schedule(self, inst: Instance) -> None:
        """Ask the decider for a plan for ``inst`` and apply it."""
        if inst.dead or not (inst.queue or self._kv_capped):
            return  # nothing waits, and no user's KV cap needs watching (the common case on every step)
        now = self.clock()
        get = self.table.get
        # the decider places at most a batch's worth (a slot each, freed or preempted); a few more for quotas
        head = inst.queue.head(2 * int(inst.info.get("max_batch") or 16) + 8)
        ready = [self._view(get(pid), now, inst) for pid in head]
        running = [self._view(get(pid), now, inst) for pid in inst.running]
        parked = [self._view(get(pid), now, inst) for pid in inst.parked if get(pid).kv == KV_DEVICE]
        caps = {t.user: self.quotas.of(t.user).max_kv_blocks for t in [*ready, *running, *parked]}
        caps = {u: c for u, c in caps.items() if c is not None}
        plan = decide(self.sched, inst.capacity(caps or None), ready, running, parked)
        if plan:
            self._apply(inst, plan, {t.pid: t for t in ready}, now)

    def _apply(self, inst: Instance, plan: Plan, ready: dict[int, Task], now: float) -> None:
        for pid, mode in plan.evict:
            self._switch_out(inst, self.table.get(pid), mode)
        for pid, mode in plan.preempt:
            proc = self.table.get(pid)
            inst.running.discard(pid)
            proc.sched.preemptions += 1
            self._switch_out(inst, proc, mode)
            proc.transition(State.READY, now)
            self._enqueue(inst, proc, now)
            self.log.info("preempted", pid=pid, mode=mode, by="scheduler")
        for pid in plan.admit:
            proc = self.table.get(pid)
            inst.queue.remove(pid)
            proc.waited_s += now - proc.state_since
            proc.admitted_level = ready[pid].level
            proc.run_tokens = 0
            if not proc.in_engine:  # new, or resumed from its tokens so far (its worker crashed, or the kernel did)
                sent = self._tell(inst, wp.Add(pid, proc.prompt_ids, proc.params, proc.owner, proc.priority,
                                               proc.session, list(proc.token_ids) or None))
                proc.in_engine = sent
            else:
                inst.parked.discard(pid)
                sent = self._tell(inst, wp.Resume(pid, proc.priority))
                proc.sched.swaps_in += sent and proc.kv == KV_SWAP
            if not sent:  # the executor is going away: its WorkerDied ends the process
                self._enqueue(inst, proc, now)
                break
            proc.kv = KV_DEVICE
            proc.transition(State.RUNNING, now)
            if proc.admitted_at is None:
                proc.admitted_at = time.time()
                self.timers.cancel(pid, "queue")
            inst.running.add(pid)
        # last: ending a process schedules again, on the state this plan left
        for pid in plan.over_quota:
            proc = self.table.get(pid)
            if proc.state is State.ZOMBIE:
                continue
            cap = self.quotas.of(proc.owner).max_kv_blocks
            held = proc.kv_blocks
            self._tell(inst, wp.Abort(pid))
            self._finish(proc, "error", error=wire_error(
                Errno.EDQUOT, f"process {pid} holds {held} KV blocks and user {proc.owner} may hold at most {cap}: "
                              "it ended there, its partial output kept"))

    def _arm(self, pid: int, kind: str, at: float) -> None:
        self.timers.arm(pid, kind, at)
        self._rearm()

    def _rearm(self) -> None:
        """Have a Tick arrive when the earliest timer is due (only in a running kernel's loop)."""
        at = self.timers.next_at()
        if at is None or self.tick_s == 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(max(0.0, at - self.clock()) + 0.001, self._timer_due)

    def _timer_due(self) -> None:
        try:
            self.tell(m.Tick())
        except ActorStopped:
            pass

    def _finish(self, proc: LLMProcess, reason: str, final_text: str | None = None,
                error: dict | None = None) -> None:
        now = self.clock()
        if proc.state is State.STOPPED:
            self.stopped_runnable -= proc.stopped_from is State.READY
        proc.transition(State.ZOMBIE, now)
        left = self.live_of.pop(proc.owner, 1) - 1
        if left:
            self.live_of[proc.owner] = left
        proc.finished_at = time.time()
        proc.ended = now
        proc.finish_reason = reason
        proc.error = error
        proc.in_engine = False
        proc.kv = KV_NONE
        if final_text is not None:
            proc.final_text = final_text
        self.timers.cancel(proc.pid)
        self.turn_pending.discard(proc.pid)
        self.turn_writes.pop(proc.pid, None)
        inst = self.where.pop(proc.pid, None)
        if proc.model in self.orphans:
            self.orphans[proc.model].discard(proc.pid)
        if inst is not None:
            inst.queue.remove(proc.pid)
            inst.running.discard(proc.pid)
            inst.parked.discard(proc.pid)
            inst.placed.discard(proc.pid)
        result = proc.result()
        self.finished.add(result["stats"], reason, proc.model, proc.sched.to_wire())
        if proc.session:  # a write in flight gets its turn's counts too
            turn = self._turn_result(proc)["stats"]
            result["stats"] = {**result["stats"], "prefill_tokens": turn["prefill_tokens"],
                               "context_tokens": turn["context_tokens"]}
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
        if inst is not None:
            self._schedule(inst)

    def _reap(self, pid: int) -> None:
        self.table.reap(pid)
        self.subscribers.pop(pid, None)
        if self.journal is not None:
            self.journal.reaped(pid)

    def _reap_expired(self, owner: str | None = None) -> None:
        """Apply the retention policy to every ZOMBIE (or to one owner's, when a process of theirs finished)."""
        zombies = [Zombie(p.pid, p.owner, p.ended or 0.0, bool(self.waiters.get(p.pid) or
                                                                     self.subscribers.get(p.pid)))
                   for p in self.table if p.state is State.ZOMBIE and (owner is None or p.owner == owner)]
        if not zombies:
            return
        pids = to_reap(zombies, self.clock(), self.config.zombie_ttl_s, self.config.max_zombies)
        for pid in pids:
            self._reap(pid)
        if pids:
            self.log.info("reaped", count=len(pids), pids=pids[:20], owner=owner)


def _ended(proc: LLMProcess, what: str) -> str:
    return (f"process {proc.pid} has already ended ({proc.finish_reason}): {what} applies only to a live process; "
            "its result waits for `wait`")
