"""Messages between the kernel's actors. Plain dataclasses: the actor contract is the type.

One word for a person: ``user`` is whoever calls (the account a connection speaks for); a process's
``owner`` is the user who spawned it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmos.syscalls.errors import Errno

END = object()  # put on a stream queue (stream, write) after the final chunk, with the result


# -- to the ProcessManager -----------------------------------------------------------------
@dataclass
class Spawn:
    user: str  # the caller (a process's owner is the user who spawned it)
    model: str
    executors: list[Any]  # the model's instances (Executor actors); the least loaded one runs it
    prompt_ids: list[int]
    priority: int
    params: dict[str, Any]
    session: bool = False
    deadline: float | None = None
    queue_timeout: float | None = None
    messages: list[dict] | None = None  # a chat session's first messages
    prompt: str | None = None  # a plain-text session's first text


@dataclass
class Nice:
    pid: int
    priority: int
    user: str


@dataclass
class PrepareTurn:
    """A write to a session: check it may take a turn and reserve it; answers (executor, Encode) for the handler."""

    pid: int
    user: str
    content: str
    role: str


@dataclass
class StartTurn:
    """The turn's whole context, encoded: append it to the session and run it; answers a stream queue."""

    pid: int
    user: str
    prompt_ids: list[int]


@dataclass
class CancelTurn:
    """The turn could not start (its encoding failed): the session stays BLOCKED, ready for another write."""

    pid: int


@dataclass
class Close:
    pid: int
    user: str


@dataclass
class ExecutorReady:
    """An executor's model is loaded: its id, the actor, and what the worker said about it."""

    executor: str
    ref: Any
    info: dict[str, Any]


@dataclass
class Wait:
    pid: int
    user: str
    reap: bool


@dataclass
class CancelWait:
    pid: int
    future: Any


@dataclass
class Kill:
    pid: int
    signal: str
    user: str


@dataclass
class Ps:
    pass


@dataclass
class Owner:
    """Who owns process ``pid`` (the dispatcher's access check); NoSuchProcess when there is none."""

    pid: int


@dataclass
class Stat:
    pid: int
    user: str


@dataclass
class Subscribe:
    pid: int
    user: str


@dataclass
class Unsubscribe:
    pid: int
    queue: Any


@dataclass
class StepEvents:
    executor: str
    events: list[Any]  # protocol.StepEvent
    stats: dict[str, Any] | None = None


@dataclass
class WorkerDied:
    """An executor's worker is gone. ``crashed``: it died by itself (the model manager restarts it and its
    processes wait for the new instance); otherwise it was retired (unloaded) and its processes end."""

    executor: str
    message: str
    crashed: bool = False


@dataclass
class ModelGone:
    """No instance of ``model`` will come back (its restarts failed, or it could not be loaded after a kernel
    restart): the processes waiting for one end with EIO and ``message``."""

    model: str
    message: str


@dataclass
class SpawnFailed:
    """A spawn's journal record could not be committed (ENOSPC, EIO): the process ends, unacknowledged."""

    pid: int
    error: dict[str, Any]


@dataclass
class Checkpoint:
    """Write every dirty journal record now; answers with a future resolved once they are committed."""


@dataclass
class Suspend:
    """The kernel is stopping: from now on a retired worker's processes are kept as they are (journaled,
    to resume at the next start) instead of ending."""


@dataclass
class Counts:
    pass


@dataclass
class Live:
    """How many READY or RUNNING processes each executor has."""


@dataclass
class Metrics:
    pass


# -- to an Executor ------------------------------------------------------------------------
@dataclass
class Encode:
    prompt: str | None
    messages: list[dict] | None
    prompt_ids: list[int] | None = None
    add_special_tokens: bool = True


@dataclass
class FromWorker:
    msg: dict[str, Any]


@dataclass
class Died:
    message: str
    errno: int = Errno.EIO  # ENOMEM for an instance Ray could not place


@dataclass
class Retire:
    """The model manager unloads this executor: it counts as dead from now on (its processes end)."""

    reason: str


# -- to the ModelManager -------------------------------------------------------------------
@dataclass
class Acquire:
    model: str | None
    keep_alive: float | None = None


@dataclass
class Release:
    """A spawn that acquired the model is done with the acquisition (its process is in the table, or it failed)."""

    token: Any  # what Acquire returned: the very registry entry it pinned


@dataclass
class Load:
    model: str | None
    options: dict[str, Any]


@dataclass
class Unload:
    model: str | None
    force: bool = False


@dataclass
class Describe:
    model: str | None


@dataclass
class ExecutorGone:
    executor: Any


@dataclass
class ListModels:
    pass


@dataclass
class Devices:
    pass


@dataclass
class Tick:
    pass


@dataclass
class StopAll:
    pass
