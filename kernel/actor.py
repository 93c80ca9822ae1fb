"""A small actor runtime: one mailbox per actor, one message at a time, ``tell`` and ``ask``.

An actor owns its state; others reach it only through messages. ``ask`` returns a future for
the handler's return value (or its exception). When an actor stops, every message still in its
mailbox that was asked fails with ActorStopped, and later tells/asks fail at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llmos.kernel.log import get_logger

_STOP = object()


class ActorStopped(RuntimeError):
    """Raised into asks that an actor will never answer because it stopped."""


class Actor:
    """Subclasses implement ``receive(msg)``; it runs for one message at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log = get_logger(name)
        self._mailbox: asyncio.Queue[tuple[Any, asyncio.Future | None]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._stopped = False
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Actor":
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"actor:{self.name}")
        return self

    async def stop(self) -> None:
        """Finish the message in hand, fail the rest, run ``on_stop``."""
        if self._task is None or self._task.done():
            self._fail_pending()
            self._stopped = True
            return
        self._stopping = True
        self._mailbox.put_nowait((_STOP, None))  # wakes an idle loop
        await asyncio.shield(self._task)

    @property
    def alive(self) -> bool:
        return not self._stopped and self._task is not None and not self._task.done()

    # -- messaging -------------------------------------------------------------------------
    def tell(self, msg: Any) -> None:
        if self._stopped:
            raise ActorStopped(f"actor {self.name} has stopped")
        self._mailbox.put_nowait((msg, None))

    def ask(self, msg: Any) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._stopped:
            fut.set_exception(ActorStopped(f"actor {self.name} has stopped"))
            return fut
        self._mailbox.put_nowait((msg, fut))
        return fut

    async def receive(self, msg: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Release what the actor owns. Called once, after the mailbox is closed."""

    # -- internals -------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                msg, fut = await self._mailbox.get()
                if msg is _STOP or self._stopping:
                    if fut is not None and not fut.done():
                        fut.set_exception(ActorStopped(f"actor {self.name} stopped before answering"))
                    break
                if fut is not None and fut.cancelled():
                    continue
                try:
                    result = await self.receive(msg)
                except Exception as exc:  # the actor survives a failed message
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)
                    else:
                        self.log.error("message_failed", message=type(msg).__name__, error=repr(exc))
                else:
                    if fut is not None and not fut.done():
                        fut.set_result(result)
        finally:
            self._stopped = True
            self._fail_pending()
            try:
                await self.on_stop()
            except Exception as exc:
                self.log.error("on_stop_failed", error=repr(exc))

    def _fail_pending(self) -> None:
        while not self._mailbox.empty():
            msg, fut = self._mailbox.get_nowait()
            if fut is not None and not fut.done():
                fut.set_exception(ActorStopped(f"actor {self.name} stopped before answering {type(msg).__name__}"))
