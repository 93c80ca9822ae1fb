"""Sessions: a process that stays alive between turns, as a context manager over a client.

``with handle.session(model=..., system=..., **sampling) as s: s.send("hi")`` spawns a session
process (it blocks, its KV context kept, until a ``write`` brings the next turn), sends turns with
``send``/``stream`` and closes it when the ``with`` ends, exceptions included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

from llmos._wire import no_chat_template, session_spawns, text_or_raise
from llmos.syscalls.errors import KernelGone, LLMOSError, NoSuchProcess
from llmos.types import ProcessResult, TurnResult

if TYPE_CHECKING:
    from llmos.aclient import AsyncClient
    from llmos.client import Client


def open_session(client: "Client", model: Any, system: str | None, params: dict[str, Any]) -> int:
    """Spawn a session process and return its pid: with the system prompt as a system message when the
    model has a chat template, else with no prompt (the kernel starts it BLOCKED)."""
    tries = session_spawns(system)
    for i, extra in enumerate(tries):
        try:
            return client.spawn(model=model, session=True, **extra, **params)
        except LLMOSError as exc:
            if i + 1 == len(tries) or not no_chat_template(exc):
                raise
    raise AssertionError("unreachable")


class Session:
    """A conversation with one session process.

    ``pid``: the session's process id. ``last``: the last turn's TurnResult (None before the first),
    whose ``stats.prefill_tokens`` is what the turn computed (its new tokens, plus any recomputation).
    ``result``: the process's ProcessResult once closed.
    """

    def __init__(self, client: "Client", model: Any = None, system: str | None = None, **sampling: Any) -> None:
        self.client = client
        self.pid: int = open_session(client, model, system, sampling)
        self.last: TurnResult | None = None
        self.result: ProcessResult | None = None

    def send(self, content: str, role: str = "user") -> str:
        """Send one turn and return the reply's text. Raises the turn's error (e.g. TimedOut for a deadline),
        NoSuchProcess once the session ended, Busy while another turn is under way."""
        self.last = self.client.write(self.pid, content, role)
        return text_or_raise(self.last)

    def stream(self, content: str, role: str = "user") -> Iterator[str]:
        """Send one turn and yield the reply's text chunks as generated; ``last`` is set once it ends (an
        error the turn ended with is raised after its chunks)."""
        turn = self.client.write_stream(self.pid, content, role)
        try:
            yield from turn
        finally:
            turn.close()
        assert turn.result is not None, "a write stream ends with the turn's result"
        self.last = turn.result
        text_or_raise(turn.result)

    def close(self) -> ProcessResult | None:
        """End the session and reap it; its ProcessResult, or None if it had already gone. Safe to call twice."""
        if self.result is None:
            try:
                self.result = self.client.close(self.pid)
            except NoSuchProcess:
                return None
        return self.result

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            self.close()
        except (KernelGone, LLMOSError):
            if exc_type is None:  # a failure of our own close is the user's to see, not one that hides theirs
                raise


class AsyncSession:
    """The asyncio variant of Session: ``async with client.session(...) as s: await s.send("hi")``."""

    def __init__(self, client: "AsyncClient", model: Any = None, system: str | None = None, **sampling: Any) -> None:
        self.client = client
        self.model, self.system, self.sampling = model, system, sampling
        self.pid: int | None = None
        self.last: TurnResult | None = None
        self.result: ProcessResult | None = None

    async def open(self) -> "AsyncSession":
        tries = session_spawns(self.system)
        for i, extra in enumerate(tries):
            try:
                self.pid = await self.client.spawn(model=self.model, session=True, **extra, **self.sampling)
                return self
            except LLMOSError as exc:
                if i + 1 == len(tries) or not no_chat_template(exc):
                    raise
        raise AssertionError("unreachable")

    async def send(self, content: str, role: str = "user") -> str:
        """Send one turn and return the reply's text (raises as Session.send)."""
        assert self.pid is not None, "open the session first (async with)"
        self.last = await self.client.write(self.pid, content, role)
        return text_or_raise(self.last)

    async def stream(self, content: str, role: str = "user") -> AsyncIterator[str]:
        """Send one turn and yield the reply's text chunks; ``last`` is set once it ends."""
        assert self.pid is not None, "open the session first (async with)"
        turn = self.client.write_stream(self.pid, content, role)
        async for text in turn:
            yield text
        assert turn.result is not None, "a write stream ends with the turn's result"
        self.last = turn.result
        text_or_raise(turn.result)

    async def close(self) -> ProcessResult | None:
        """End the session and reap it (as Session.close)."""
        if self.result is None and self.pid is not None:
            try:
                self.result = await self.client.close(self.pid)
            except NoSuchProcess:
                return None
        return self.result

    async def __aenter__(self) -> "AsyncSession":
        return await self.open()

    async def __aexit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            await self.close()
        except (KernelGone, LLMOSError):
            if exc_type is None:
                raise
