"""Messages between the kernel's actors. Plain dataclasses: the actor contract is the type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# -- to the ProcessManager -----------------------------------------------------------------
@dataclass
class Spawn:
    owner: str
    model: str
    executors: list[Any]  # the model's instances; the least loaded one runs it
    prompt_ids: list[int]
    priority: int
    params: dict[str, Any]


@dataclass
class Wait:
    pid: int
    owner: str
    reap: bool


@dataclass
class CancelWait:
    pid: int
    future: Any


@dataclass
class Kill:
    pid: int
    signal: str
    owner: str


@dataclass
class Ps:
    pass


@dataclass
class Stat:
    pid: int


@dataclass
class Subscribe:
    pid: int
    owner: str


@dataclass
class Unsubscribe:
    pid: int
    queue: Any


@dataclass
class StepEvents:
    executor: str
    events: list[list]
    running: int = 0


@dataclass
class WorkerDied:
    executor: str
    message: str


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


@dataclass
class Add:
    pid: int
    prompt_ids: list[int]
    params: dict[str, Any]
    user: str = ""
    priority: int = 0


@dataclass
class Abort:
    pid: int


@dataclass
class FromWorker:
    msg: dict[str, Any]


@dataclass
class Died:
    message: str


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
