"""What every app shares: its prompt (chat messages, or plain text for a model without a chat template), and
one process run on the kernel with its text streamed as it is generated.

An app is a small program on the client API: it builds a :class:`Prompt`, and :class:`AppModel` spawns it,
streams the process's text to a writer, and reaps it. Whether the model has a chat template is learnt from
the kernel: the messages are sent first, and a model without a template refuses them (EINVAL, "no chat
template"), after which the prompt's plain text is sent instead, for this and every later call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from llmos._wire import no_chat_template, text_or_raise
from llmos.syscalls.errors import LLMOSError, NoSuchProcess
from llmos.types import ProcessResult

if TYPE_CHECKING:
    from llmos.client import Client

Write = Callable[[str], None]


@dataclass(frozen=True)
class Prompt:
    """One request as an app builds it.

    ``messages``: chat messages ({role, content}), rendered by the kernel with the model's own chat template
    (the apps send one user message: some templates, Gemma's, refuse a system one). ``plain``: the text sent
    as the prompt instead to a model without a chat template."""

    messages: list[dict[str, str]]
    plain: str


def user_prompt(content: str, plain: str) -> Prompt:
    """A prompt of one user message ``content``; ``plain`` for a model without a chat template."""
    return Prompt([{"role": "user", "content": content}], plain)


@dataclass
class Call:
    """One process an app ran: its pid, what it was for, and the kernel's counts (tokens) for it."""

    pid: int
    purpose: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AppModel:
    """The model an app runs on, over one client.

    ``model``: a model directory, a store model name, or None (the kernel's default). ``params``: spawn's
    fields (max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos, deadline, queue_timeout).
    ``on_spawn(purpose, pid)``: told of each process as it starts: ``pid`` None just before the spawn (the model
    may load meanwhile), then its pid (``-v`` prints it; a spinner shows the stage). ``chat_template``: whether
    the model has one, None until the first spawn tells. ``calls``: every process run, in order; ``warnings``
    what the kernel said about them (max_new_tokens cut to the context...); ``last`` the last one's result."""

    client: "Client"
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    on_spawn: Callable[[str, int | None], None] | None = None
    chat_template: bool | None = None
    calls: list[Call] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    last: ProcessResult | None = None  # the last process's result

    def spawn(self, prompt: Prompt, **override: Any) -> int:
        """Start a process for ``prompt`` and return its pid: the messages, or the plain text on a model with no
        chat template. ``override``: spawn fields for this call only. Raises as Client.spawn."""
        params = {**self.params, **override}
        if self.chat_template is not False:
            try:
                pid = self.client.spawn(messages=prompt.messages, model=self.model, priority=self.priority, **params)
                self.chat_template = True
                return pid
            except LLMOSError as exc:
                if not no_chat_template(exc):
                    raise
                self.chat_template = False
        return self.client.spawn(prompt=prompt.plain, model=self.model, priority=self.priority, **params)

    def run(self, prompt: Prompt, write: Write | None = None, purpose: str = "", **override: Any) -> ProcessResult:
        """Run ``prompt`` to its end, giving ``write`` each piece of text as it is generated, and return the
        process's result (reaped). An error the process ended with is raised (TimedOut past --deadline...); a
        process killed by someone else returns with finish_reason "killed". An exception here (Ctrl-C, SIGTERM
        to the command) ends the process first (TERM) and reaps it: an app never leaves one behind."""
        if self.on_spawn is not None:
            self.on_spawn(purpose, None)
        pid = self.spawn(prompt, **override)
        if self.on_spawn is not None:
            self.on_spawn(purpose, pid)
        stream = self.client.stream(pid)
        try:
            for text in stream:
                if write is not None:
                    write(text)
        except BaseException:
            stream.close()
            _end(self.client, pid)
            raise
        result = stream.result
        assert result is not None, "a stream ends with its final frame"
        _reap(self.client, pid)
        self.calls.append(Call(pid, purpose, result.stats.prompt_tokens, result.stats.output_tokens,
                               result.finish_reason))
        self.warnings.extend(f"pid {pid}: warning: {w}" for w in result.warnings)
        self.last = result
        if result.finish_reason == "error":
            text_or_raise(result)
        return result

    def count(self, text: str) -> int:
        """Tokens of ``text`` under the model's tokenizer, no BOS added: counted by the kernel (the ``score``
        syscall tokenises it there; a forward pass per half context comes with it)."""
        if not text:
            return 0
        return int(self.client.score(text, self.model, add_special_tokens=False, timeout=None)["tokens"])

    def info(self) -> dict[str, Any]:
        """The loaded model's description (context_len, max_prompt_chars, has_chat_template...): the first
        instance's, from ``model_info``, loading the model first if it is not (a score of one token loads it)."""
        described = self.client.model_info(self.model)
        if not described.get("loaded") or not described.get("executors"):
            self.client.score("a", self.model, add_special_tokens=False, timeout=None)
            described = self.client.model_info(self.model)
        executors = described.get("executors") or [{}]
        return executors[0]


def _end(client: "Client", pid: int) -> None:
    """TERM our process and reap it; nothing to do if it is gone (or the kernel is)."""
    try:
        client.kill(pid, "TERM")
        client.wait(pid, timeout=30)
    except (NoSuchProcess, LLMOSError):
        pass


def _reap(client: "Client", pid: int) -> None:
    try:
        client.wait(pid, timeout=30)
    except NoSuchProcess:
        pass  # collected by another client first
