"""LLM processes and the process table: states, records, results, pid allocation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from llmos.syscalls.errors import InvalidArgument, NoSuchProcess


class State(str, Enum):
    NEW = "NEW"  # created, prompt not yet accepted by a model
    READY = "READY"  # waiting in a run queue
    RUNNING = "RUNNING"  # in a model's current batch
    BLOCKED = "BLOCKED"  # a session waiting for its next turn (a write)
    STOPPED = "STOPPED"  # suspended by STOP until CONT
    ZOMBIE = "ZOMBIE"  # finished; keeps its result until reaped


# Which transitions are legal; anything else is a kernel bug and raises.
_TRANSITIONS: dict[State, set[State]] = {
    State.NEW: {State.READY, State.BLOCKED, State.ZOMBIE},
    State.READY: {State.RUNNING, State.STOPPED, State.ZOMBIE},
    State.RUNNING: {State.READY, State.BLOCKED, State.STOPPED, State.ZOMBIE},
    State.BLOCKED: {State.READY, State.STOPPED, State.ZOMBIE},
    State.STOPPED: {State.READY, State.BLOCKED, State.ZOMBIE},
    State.ZOMBIE: set(),
}

# Where a process's KV context is (the kernel's view; the engine reports every move)
KV_NONE, KV_DEVICE, KV_SWAP = "none", "device", "swap"


@dataclass
class SchedStats:
    """What the scheduler did to one process (counts; ``time_in_state`` in seconds per state)."""

    preemptions: int = 0
    swaps_out: int = 0
    swaps_in: int = 0
    recomputed_tokens: int = 0
    prefill_tokens: int = 0
    turns: int = 0
    time_in_state: dict[str, float] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"preemptions": self.preemptions, "swaps_out": self.swaps_out, "swaps_in": self.swaps_in,
                "recomputed_tokens": self.recomputed_tokens, "prefill_tokens": self.prefill_tokens,
                "turns": self.turns, "time_in_state": {k: round(v, 6) for k, v in self.time_in_state.items()}}


@dataclass
class LLMProcess:
    """One generation on one model. Owned by the ProcessManager; nobody else mutates it."""

    pid: int
    owner: str
    model: str
    priority: int
    params: dict[str, Any]
    prompt_ids: list[int]
    created: float = field(default_factory=time.time)
    state: State = State.NEW
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None  # unix time, like created (durations in stats are between the two)
    ended: float | None = None  # monotonic time it became a ZOMBIE (retention counts from it)
    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    final_text: str | None = None
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    signal: str | None = None
    max_new_tokens: int | None = None  # the output limit that applies (asked for, or cut by the context)
    warnings: list[str] = field(default_factory=list)  # what the kernel changed about the request
    # -- the scheduler's fields (ProcessManager only) --
    session: bool = False
    deadline_s: float | None = None  # per run (per turn for a session), from its start
    queue_timeout_s: float | None = None  # most time READY before it first runs
    sched: SchedStats = field(default_factory=SchedStats)
    state_since: float = 0.0  # monotonic time of the last transition
    arrival: float = 0.0  # monotonic time it was created
    in_engine: bool = False  # the worker holds its sequence (added, and not yet ended)
    kv: str = KV_NONE  # where its KV context is: none, device, swap
    block_size: int = 8
    waited_s: float = 0.0  # time spent READY before the current wait (aging credit)
    admitted_level: float = 0.0  # the aged level it was admitted at
    run_tokens: int = 0  # tokens generated since it was last admitted or resumed
    preempts_pending: int = 0  # Preempt ops sent to the worker and not yet answered
    stopped_from: State | None = None  # where CONT returns it: READY or BLOCKED
    messages: list[dict] | None = None  # a chat session's conversation so far
    transcript: str | None = None  # a plain-text session's context so far
    turn_started: float | None = None  # monotonic time of the current turn's write
    turn_prefill: int = 0  # tokens prefilled for the current turn
    # the process table's observer: told of every transition (the journal records the process from there)
    observer: Callable[["LLMProcess"], None] | None = field(default=None, repr=False, compare=False)

    @property
    def context_tokens(self) -> int:
        """Tokens of context its KV holds (or will, once computed): prompt plus output so far."""
        return len(self.prompt_ids) + len(self.token_ids)

    @property
    def kv_blocks(self) -> int:
        """KV blocks it holds on the device now (the kernel's estimate: context plus the next token)."""
        if self.kv != KV_DEVICE:
            return 0
        return -(-(self.context_tokens + 1) // self.block_size)

    def limit_output(self, context_len: int | None) -> None:
        """Record the output limit that applies: ``max_new_tokens``, cut to what the model's context
        holds after the prompt (with a warning saying so)."""
        asked = self.params.get("max_new_tokens")
        self.max_new_tokens = asked
        if context_len is None or asked is None:
            return
        room = max(context_len - len(self.prompt_ids), 0)
        if asked > room:
            self.max_new_tokens = room
            self.warnings.append(f"max_new_tokens {asked} was cut to {room}: the model's context holds "
                                 f"{context_len} tokens and the prompt takes {len(self.prompt_ids)}")

    def transition(self, new: State, now: float | None = None) -> None:
        """Move to ``new`` (RuntimeError for an illegal move: a kernel bug), adding the time spent in the
        old state to ``sched.time_in_state`` when ``now`` (monotonic seconds) is given."""
        if new not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"pid {self.pid}: illegal transition {self.state.value} -> {new.value}")
        if now is not None:
            spent = self.sched.time_in_state
            spent[self.state.value] = spent.get(self.state.value, 0.0) + max(0.0, now - self.state_since)
            self.state_since = now
        self.state = new
        if self.observer is not None:
            self.observer(self)

    @property
    def text(self) -> str:
        return self.final_text if self.final_text is not None else "".join(self.text_parts)

    def stats(self) -> dict[str, Any]:
        n = len(self.token_ids)
        end = self.finished_at or time.time()
        queue = (self.admitted_at or end) - self.created
        ttft = (self.first_token_at - self.created) if self.first_token_at else None
        tpot = None
        if self.first_token_at and self.last_token_at and n > 1:
            tpot = (self.last_token_at - self.first_token_at) / (n - 1)
        return {
            "prompt_tokens": len(self.prompt_ids),
            "output_tokens": n,
            "max_new_tokens": self.max_new_tokens,
            "queue_time_s": queue,
            "ttft_s": ttft,
            "tpot_s": tpot,
            "total_time_s": end - self.created,
        }

    def record(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "owner": self.owner,
            "model": self.model,
            "priority": self.priority,
            "state": self.state.value,
            "prompt_tokens": len(self.prompt_ids),
            "output_tokens": len(self.token_ids),
            "created": self.created,
            "finish_reason": self.finish_reason,
            "session": self.session,
            "kv_blocks": self.kv_blocks,
            "preemptions": self.sched.preemptions,
        }

    def result(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "state": self.state.value,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "error": self.error,
            "signal": self.signal,
            "stats": self.stats(),
            "sched": self.sched.to_wire(),
            "warnings": list(self.warnings),
        }


class ProcessTable:
    """pid -> LLMProcess. Pids grow monotonically and are never reused: with a journal, not even across
    kernel restarts (the next pid is journaled with every spawn and restored at start).

    ``observer`` (the journal's hook) is told of every process created and every transition."""

    def __init__(self, observer: Callable[[LLMProcess], None] | None = None) -> None:
        self._procs: dict[int, LLMProcess] = {}
        self._next_pid = 1
        self.observer = observer

    @property
    def next_pid(self) -> int:
        return self._next_pid

    def restore(self, proc: LLMProcess) -> None:
        """Put back a process read from the journal (its pid is kept; later pids come after it)."""
        proc.observer = self.observer
        self._procs[proc.pid] = proc
        self._next_pid = max(self._next_pid, proc.pid + 1)

    def skip_to(self, next_pid: int) -> None:
        """Never hand out a pid below ``next_pid`` (the journal's counter: pids of reaped processes too)."""
        self._next_pid = max(self._next_pid, next_pid)

    def create(self, *, owner: str, model: str, priority: int, params: dict[str, Any],
               prompt_ids: list[int], session: bool = False) -> LLMProcess:
        if not prompt_ids and not session:
            raise InvalidArgument("empty prompt")
        proc = LLMProcess(self._next_pid, owner, model, priority, params, list(prompt_ids), session=session,
                          observer=self.observer)
        self._procs[proc.pid] = proc
        self._next_pid += 1
        return proc

    def get(self, pid: int) -> LLMProcess:
        try:
            return self._procs[pid]
        except KeyError:
            raise NoSuchProcess(f"no process {pid}") from None

    def reap(self, pid: int) -> LLMProcess:
        proc = self.get(pid)
        if proc.state is not State.ZOMBIE:
            raise RuntimeError(f"pid {pid} is {proc.state.value}, not a ZOMBIE")
        return self._procs.pop(pid)

    def __iter__(self):
        return iter(list(self._procs.values()))

    def __len__(self) -> int:
        return len(self._procs)

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in State}
        for p in self._procs.values():
            out[p.state.value] += 1
        return out
