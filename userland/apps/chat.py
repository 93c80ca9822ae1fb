"""``llmos app chat``: a dialogue: each line of the input is a user turn of one session, each reply streamed.

Prompt: a session (a process that keeps its context between turns) whose first message is the system prompt
(default SYSTEM; ``--system TEXT`` replaces it, ``--system ''`` sends none), then each line as a user message,
rendered by the model's chat template. For a model without a chat template the session is plain text: the
first turn is ``{system}\\n\\nUser: {line}\\nAssistant:``, each later one ``\\nUser: {line}\\nAssistant:``, and
generation stops at ``\\nUser:`` (the model would otherwise write the user's next line itself).
"""

from __future__ import annotations

from typing import Any

from llmos._wire import text_or_raise
from llmos.apps.base import AppModel, Write
from llmos.syscalls.errors import KernelGone, LLMOSError, NoSuchProcess
from llmos.types import ProcessResult, TurnResult

SYSTEM = "You are a helpful assistant. Answer clearly and briefly."
PLAIN_STOP = "\nUser:"


def plain_turn(line: str, system: str | None, first: bool) -> str:
    """A turn's text in a plain-text session (a model without a chat template)."""
    head = (f"{system}\n\n" if system else "") if first else "\n"
    return f"{head}User: {line}\nAssistant:"


class Dialogue:
    """One session on ``app``'s model; ``turn(line, write)`` sends a user line and streams the reply. A context
    manager: leaving it closes the session (its ProcessResult in ``result``). Raises as Client.spawn."""

    def __init__(self, app: AppModel, system: str | None = SYSTEM) -> None:
        self.app, self.system = app, system or None
        self.template = bool(app.info().get("has_chat_template"))
        params: dict[str, Any] = dict(app.params)
        if not self.template:
            params["stop"] = [*(params.get("stop") or []), PLAIN_STOP]
        messages = [{"role": "system", "content": self.system}] if self.template and self.system else None
        if app.on_spawn is not None:
            app.on_spawn("session", None)
        self.pid: int = app.client.spawn(messages=messages, model=app.model, priority=app.priority, session=True,
                                         **params)
        app.chat_template = self.template
        if app.on_spawn is not None:
            app.on_spawn("session", self.pid)
        self.turns = 0
        self.last: TurnResult | None = None
        self.result: ProcessResult | None = None

    def turn(self, line: str, write: Write | None = None) -> TurnResult:
        """Send ``line`` as the next user turn, giving ``write`` the reply's text as generated; the TurnResult
        once it ends. The error a turn ended with (TimedOut past --deadline...) is raised after its text."""
        content = line if self.template else plain_turn(line, self.system, self.turns == 0)
        self.turns += 1
        stream = self.app.client.write_stream(self.pid, content)
        try:
            for text in stream:
                if write is not None:
                    write(text)
        finally:
            stream.close()
        assert stream.result is not None, "a write stream ends with the turn's result"
        self.last = stream.result
        text_or_raise(stream.result)
        return stream.result

    def close(self) -> ProcessResult | None:
        """End the session and reap it (safe twice)."""
        if self.result is None:
            try:
                self.result = self.app.client.close(self.pid)
            except NoSuchProcess:
                return None
        return self.result

    def __enter__(self) -> "Dialogue":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            self.close()
        except (KernelGone, LLMOSError):
            if exc_type is None:
                raise
