"""Recovery: processes that outlive their worker or their kernel (the ProcessManager's part that handles them).

A crashed worker's processes become *orphans*: off the dead instance, their tokens kept; another live instance
of the same model adopts them at once, else they wait unplaced until the model manager's replacement instance
reports ready, which adopts them and each resumes with its
output so far re-prefilled (``protocol.Add.output_ids``): greedy output is token-identical to an
uninterrupted run. The same path restores a kernel's processes from the journal after a crash or a stop:
they wait for their model to load. A model that will not come back (``ModelGone``) ends its orphans with EIO.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llmos.kernel import messages as m
from llmos.kernel.actor import ActorStopped
from llmos.kernel.instance import Instance
from llmos.kernel.process import KV_NONE, LLMProcess, State
from llmos.syscalls.errors import Errno, wire_error


class RecoveryMixin:
    """Orphans, adoption, the journal's restore and durable spawns, mixed into the ProcessManager."""

    def worker_died(self, msg: m.WorkerDied) -> None:
        """A worker is gone. Crashed: its processes wait for the instance the model manager starts in its place
        (and resume from their tokens so far, re-prefilled). Retired (unloaded): they end with EIO, unless the
        kernel is stopping (then they stay as they are, journaled, and resume at the next start)."""
        inst = self.instances.pop(msg.executor, None)
        if inst is None:
            return
        inst.dead = True
        err = wire_error(Errno.EIO, msg.message)
        now = self.clock()
        waiting = 0
        for pid in sorted(inst.placed):
            proc = self.table.get(pid)
            if proc.state is State.ZOMBIE:
                continue
            if msg.crashed or self.suspended:
                self._orphan(proc, inst, now)
                waiting += 1
            else:
                self._finish(proc, "error", error=err)
        if msg.crashed:
            self.log.info("worker_crashed", executor=msg.executor, waiting=waiting)
            # another live instance of the model takes them now (the replacement takes what arrives later)
            model = getattr(inst.ref, "model_path", None)
            others = [i for i in self.instances.values() if not i.dead and getattr(i.ref, "model_path", None) == model]
            if others and not self.suspended:
                self._adopt(min(others, key=lambda i: len(i.placed)), model)

    def model_gone(self, msg: m.ModelGone) -> None:
        if self.suspended:  # the kernel is stopping: they resume at the next start
            return
        err = wire_error(Errno.EIO, msg.message)
        for pid in sorted(self.orphans.pop(msg.model, set())):
            proc = self._lookup(pid)
            if proc is not None and proc.state is not State.ZOMBIE:
                self._finish(proc, "error", error=err)

    def orphan_models(self) -> list[str]:
        """The models that processes wait for (restored from the journal, or whose worker crashed)."""
        return sorted(m_ for m_, pids in self.orphans.items() if pids)

    def _orphan(self, proc: LLMProcess, inst: Instance, now: float) -> None:
        """Take a process off a dead instance: it keeps its tokens and waits, unplaced, for a new instance."""
        pid = proc.pid
        inst.queue.remove(pid)
        inst.running.discard(pid)
        inst.parked.discard(pid)
        inst.placed.discard(pid)
        self.where.pop(pid, None)
        proc.in_engine = False
        proc.kv = KV_NONE
        proc.preempts_pending = 0
        if proc.state is State.RUNNING:
            proc.sched.preemptions += 1
            proc.sched.recomputed_tokens += proc.context_tokens
            proc.transition(State.READY, now)
            proc.state_since = now
        self.orphans.setdefault(proc.model, set()).add(pid)

    def _adopt(self, inst: Instance, model: str | None) -> None:
        """Place the processes waiting for an instance of ``model`` on ``inst`` (a new or restarted worker)."""
        pids = self.orphans.pop(model, None) if model is not None else None
        if not pids:
            return
        now = self.clock()
        for pid in sorted(pids):
            proc = self._lookup(pid)
            if proc is None or proc.state is State.ZOMBIE:
                continue
            inst.placed.add(pid)
            self.where[pid] = inst
            proc.block_size = inst.block_size
            if proc.state is State.READY:
                self._enqueue(inst, proc, now)
        self.log.info("adopted", executor=inst.id, model=model, count=len(pids))
        self._schedule(inst)

    def _restore(self, next_pid: int, procs: list[LLMProcess]) -> None:
        """The journal's processes, back in the table: ZOMBIEs with their results (retention counts from now),
        the others waiting for their model (READY, or STOPPED/BLOCKED as they were)."""
        now = self.clock()
        self.table.skip_to(next_pid)
        for proc in procs:
            self.table.restore(proc)
            proc.arrival = proc.state_since = now
            if proc.state is State.ZOMBIE:
                proc.ended = now
                continue
            self.live_of[proc.owner] = self.live_of.get(proc.owner, 0) + 1
            if proc.state in (State.NEW, State.RUNNING):
                proc.state = State.READY  # it runs again from its checkpoint (no observer: nothing changed yet)
            if proc.state is State.STOPPED:
                self.stopped_runnable += proc.stopped_from is State.READY
            if proc.deadline_s is not None and proc.state is not State.BLOCKED:
                self.timers.arm(proc.pid, "deadline", now + proc.deadline_s)
            if proc.queue_timeout_s is not None and proc.admitted_at is None:
                self.timers.arm(proc.pid, "queue", now + proc.queue_timeout_s)
            self.orphans.setdefault(proc.model, set()).add(proc.pid)
        if procs:
            self.log.info("restored", processes=len(procs), next_pid=self.table.next_pid,
                          waiting={k: len(v) for k, v in self.orphans.items()})

    def _durable(self, pid: int) -> Any:
        """The spawn's answer: its pid, once the journal has committed its record (a future then)."""
        if self.journal is None:
            return pid
        fut = self.journal.spawned(self.table.get(pid), self.table.next_pid)

        def failed(f: asyncio.Future) -> None:
            exc = f.exception()
            if exc is not None:
                try:
                    self.tell(m.SpawnFailed(pid, getattr(exc, "to_wire", lambda: wire_error(Errno.EIO, str(exc)))()))
                except ActorStopped:
                    pass
        fut.add_done_callback(failed)
        return fut

    def _lookup(self, pid: int) -> LLMProcess | None:
        try:
            return self.table.get(pid)
        except Exception:
            return None
