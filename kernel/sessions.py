"""Sessions: processes that stay alive between turns (the ProcessManager's part that handles them).

A session blocks (BLOCKED) after each reply with its KV context kept; ``write`` brings the next turn:
``prepare_turn`` checks and reserves it and says how to encode it, the handler has the worker encode
it, ``start_turn`` appends it to the session's context and makes it READY. A chat session's context
is its messages re-rendered with the chat template (the engine keeps the KV of the common prefix);
a plain-text session's is its token ids, to which the turn's tokens are appended (never re-tokenised).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from llmos.drivers.model import protocol as wp
from llmos.kernel import messages as m
from llmos.kernel.instance import context_len
from llmos.kernel.process import LLMProcess, State
from llmos.syscalls.errors import Busy, DeviceError, InvalidArgument, TooBig, TryAgain


class SessionsMixin:
    """Session turns, mixed into the ProcessManager (its state: table, where, subscribers, timers, quotas)."""

    def prepare_turn(self, msg: m.PrepareTurn) -> tuple[Any, m.Encode]:
        proc = self._owned(msg.pid, msg.user)
        if not proc.session:
            raise InvalidArgument(f"process {proc.pid} is not a session (spawn it with session=true to write to it)")
        if proc.state is State.ZOMBIE:
            raise InvalidArgument(f"session {proc.pid} has ended ({proc.finish_reason})")
        if proc.pid in self.turn_pending:
            raise Busy(f"session {proc.pid} is taking another write's turn; wait for that reply, then write")
        if proc.state is not State.BLOCKED:
            raise Busy(f"session {proc.pid} is {proc.state.value}"
                       + (" (stopped: CONT it first)" if proc.state is State.STOPPED else
                          ": it is still answering; wait for the reply (stream it), then write"))
        inst = self.where.get(proc.pid)
        if proc.pid in self.orphans.get(proc.model, ()):
            raise TryAgain(f"the model of session {proc.pid} is restarting (its worker or the kernel stopped); "
                           "its context is kept: retry in a few seconds")
        if inst is None or inst.dead:
            raise DeviceError(f"the model instance of session {proc.pid} has stopped")
        self.turn_pending.add(proc.pid)
        self.turn_writes[proc.pid] = {"role": msg.role, "content": msg.content}
        if proc.messages is not None:
            return inst.ref, m.Encode(None, [*proc.messages, {"role": msg.role, "content": msg.content}])
        # a plain-text session's turn is its text's tokens after the context it holds (never re-tokenised)
        return inst.ref, m.Encode(msg.content, None, add_special_tokens=False)

    def start_turn(self, msg: m.StartTurn) -> asyncio.Queue:
        self.turn_pending.discard(msg.pid)
        write = self.turn_writes.pop(msg.pid, None)
        proc = self._owned(msg.pid, msg.user)
        if proc.state is not State.BLOCKED:
            raise Busy(f"session {proc.pid} is {proc.state.value}; it can take a turn only when BLOCKED")
        now = self.clock()
        inst = self.where[proc.pid]
        ids = list(msg.prompt_ids) if proc.messages is not None else [*proc.prompt_ids, *proc.token_ids,
                                                                        *msg.prompt_ids]
        new = len(ids) - proc.context_tokens
        self.quotas.check_start(proc.owner, 0, max(new, 0), wp.blocks_for(len(msg.prompt_ids) + 1, inst.block_size),
                                now)
        self.quotas.use_tokens(proc.owner, max(new, 0), now)
        if len(ids) > (context_len(inst.info) or len(ids)):
            raise TooBig(f"session {proc.pid} would hold {len(ids)} tokens; the model's context holds "
                         f"{context_len(inst.info)}: close it and start a new one")
        proc.prompt_ids = ids
        if write is not None:  # the history the next turn is rendered from holds this write, then the reply
            if proc.messages is not None:
                proc.messages.append(write)
            else:
                proc.transcript = (proc.transcript or "") + write["content"]
        proc.limit_output(context_len(inst.info))
        self._begin_turn(proc, now)
        if proc.in_engine:
            self._tell(inst, wp.Append(proc.pid, proc.prompt_ids))
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.setdefault(proc.pid, []).append(q)
        proc.transition(State.READY, now)
        self._enqueue(inst, proc, now)
        self._schedule(inst)
        return q

    def _begin_turn(self, proc: LLMProcess, now: float) -> None:
        proc.token_ids, proc.text_parts, proc.final_text = [], [], None
        proc.first_token_at = proc.last_token_at = None
        proc.turn_started, proc.turn_prefill = now, 0
        proc.sched.turns += 1
        if proc.deadline_s is not None:
            self._arm(proc.pid, "deadline", now + proc.deadline_s)

    def _turn_result(self, proc: LLMProcess) -> dict:
        end = proc.last_token_at or time.time()
        start_wall = time.time() - (self.clock() - (proc.turn_started or self.clock()))
        return {"pid": proc.pid, "state": proc.state.value, "text": proc.text, "token_ids": list(proc.token_ids),
                "finish_reason": proc.finish_reason, "error": proc.error,
                "stats": {"prefill_tokens": proc.turn_prefill, "context_tokens": proc.context_tokens,
                          "output_tokens": len(proc.token_ids),
                          "ttft_s": (proc.first_token_at - start_wall) if proc.first_token_at else None,
                          "total_time_s": max(0.0, end - start_wall)}}

    def _end_turn(self, proc: LLMProcess, reason: str, final_text: str | None, now: float) -> None:
        """A session's reply is done: it blocks for the next write, its KV kept on the device."""
        inst = self.where[proc.pid]
        inst.running.discard(proc.pid)
        inst.parked.add(proc.pid)
        proc.transition(State.BLOCKED, now)
        proc.finish_reason = reason
        if final_text is not None:
            proc.final_text = final_text
        if proc.messages is not None:
            proc.messages.append({"role": "assistant", "content": proc.text})
        else:
            proc.transcript = (proc.transcript or "") + proc.text
        self.timers.cancel(proc.pid, "deadline")
        result = self._turn_result(proc)
        for q in self.subscribers.pop(proc.pid, []):
            q.put_nowait((m.END, result))
        self.log.info("turn", pid=proc.pid, reason=reason, output_tokens=len(proc.token_ids),
                      prefill_tokens=proc.turn_prefill)
