"""The shell's ``chat``: a conversation in the manner of Ollama's REPL, over session processes.

Each message is a turn; its reply streams as generated. A line that starts with three double quotes
opens a multi-line message, closed by the next line that ends with them. Commands: /set NAME VALUE
(sampling settings, typed and range-checked from the syscall table), /set system TEXT or /system TEXT,
/unset NAME, /show, /clear, /load MODEL, /bye (/exit), /? (/help).

The conversation (system prompt and turns) is kept here as well as in the session's context: the kernel
fixes a session's sampling and system message at spawn, so a change of settings, system prompt or model
starts a fresh session with the conversation replayed as its messages (the context is kept; a model with
no chat template cannot take them and starts afresh, as it says). /clear forgets the conversation. Ctrl-C
during a reply stops it (its session ends; the partial reply stays in the conversation); Ctrl-C at the
prompt clears the line; Ctrl-D or /bye leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

from llmos._args import syscall_arg
from llmos._wire import no_chat_template
from llmos.client import Client
from llmos.shell_views import typed_name
from llmos.syscalls.errors import InvalidArgument, LLMOSError, NoSuchProcess, error_from_errno
from llmos.syscalls.schema import check
from llmos.syscalls.table import lookup

QUOTES = '"""'
# a multi-line block opens with the quotes at the start of a message or of /set system's (or /system's) text
_OPENER = re.compile(r'^(\s*(?:/set\s+system\s+|/system\s+)?)"""')

# the names /set takes (Ollama's too) -> spawn's sampling field
SETTINGS: dict[str, str] = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
    "max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens", "num_predict": "max_new_tokens",
    "repetition_penalty": "repetition_penalty", "repeat_penalty": "repetition_penalty",
    "stop": "stop", "ignore_eos": "ignore_eos", "deadline": "deadline",
}
FIELDS = {f.name: f for f in lookup("spawn").request}
BOOLS = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}

COMMANDS: dict[str, str] = {
    "/set": "set a parameter (/set temperature 0.2) or the system prompt (/set system ...)",
    "/unset": "back to the default of a parameter or of the system prompt",
    "/system": "set the system prompt (/system You are brief.)",
    "/show": "show the model, session, system prompt and parameters",
    "/clear": "forget the conversation (a new session, the same settings)",
    "/load": "switch to another model (the conversation is kept)",
    "/bye": "leave the chat (also /exit, Ctrl-D)",
    "/?": "this help (also /help); /? shortcuts: the keys",
}
SETTING_HELP: dict[str, str] = {name: FIELDS[f].doc.split(";")[0] for name, f in SETTINGS.items()}

HELP = "\n".join(["Available commands:", *(f"  {c:<9} {what}" for c, what in COMMANDS.items()), "",
                  'Use """ to begin a multi-line message, and """ at the end of a line to end it.'])
SHORTCUTS = """Available keyboard shortcuts:
  Ctrl-C    stop the reply being generated, or clear the line
  Ctrl-D    leave the chat (on an empty line)
  Ctrl-R    search the history (Enter runs the line found)
  Tab       complete a /command, a /set name or a model
  Up/Down   the history"""


def describe_setting(name: str) -> str:
    """One line about a setting: its name, its field's type and range, and its default."""
    f = FIELDS[SETTINGS[name]]
    span = f" {f.min}..{f.max}" if f.min is not None and f.max is not None else \
        f" >= {f.min}" if f.min is not None else ""
    alias = f" (= {SETTINGS[name]})" if SETTINGS[name] != name else ""
    return f"  {name:<19} {f.type}{span}, default {_default(f.name)}{alias}"


def _default(key: str) -> Any:
    """A spawn field's default as /show and /set say it: a seed left out is drawn at random."""
    value = FIELDS[key].default_value()
    return ("random" if key == "seed" else "none") if value is None else value


def parse_setting(name: str, words: list[str]) -> tuple[str, Any]:
    """``/set NAME WORDS...`` as (spawn field, value): the type and range from the syscall table, as the CLI's
    flags. Raises InvalidArgument naming the setting (an unknown name lists the known ones)."""
    key = SETTINGS.get(name.lower())
    if key is None:
        raise InvalidArgument(f"unknown parameter {name!r}; one of: {', '.join(SETTINGS)} (or system)")
    f = FIELDS[key]
    if not words:
        raise InvalidArgument(f"/set {name} needs a value ({describe_setting(name).strip()})")
    if f.type == "list[str]":
        try:
            return key, check(f, words)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{name}: {exc.message.replace(f'field {key!r} ', '')}") from None
    if len(words) != 1:
        raise InvalidArgument(f"/set {name} takes one value, got {len(words)}")
    if f.type == "bool":
        if words[0].lower() not in BOOLS:
            raise InvalidArgument(f"{name} must be true or false, got {words[0]!r}")
        return key, BOOLS[words[0].lower()]
    try:
        return key, syscall_arg("spawn", key)(words[0])
    except argparse.ArgumentTypeError as exc:
        raise InvalidArgument(f"{name} {exc}") from None


class Multiline:
    """Gathers input lines into messages: a line is a message, unless it opens a triple-quoted block, which
    the next line ending in the quotes closes (the lines joined by newlines, the quotes removed)."""

    def __init__(self) -> None:
        self._head: str = ""
        self._parts: list[str] | None = None

    @property
    def open(self) -> bool:
        """True inside a block: the next line continues it."""
        return self._parts is not None

    def cancel(self) -> None:
        self._parts = None

    def feed(self, line: str) -> tuple[str, bool] | None:
        """(message, quoted) once ``line`` completes one (``quoted``: it came from a block, so it is sent as
        text even if it starts with '/'), None while a block is still open."""
        line = line.rstrip("\r\n")
        if self._parts is None:
            m = _OPENER.match(line)
            if not m:
                return line, False
            head, rest = m.group(1), line[m.end():]
            if rest.endswith(QUOTES):
                return head + rest[:-len(QUOTES)], not head.strip()
            self._head, self._parts = head, [rest] if rest else []
            return None
        if not line.endswith(QUOTES):
            self._parts.append(line)
            return None
        last = line[:-len(QUOTES)]
        parts = [*self._parts, *([last] if last else [])]
        self._parts = None
        return self._head + "\n".join(parts), not self._head.strip()


@dataclass
class ChatSettings:
    """What a chat's next session is spawned with: ``model`` (None: the kernel's default), ``system`` prompt,
    and ``params``: the spawn sampling fields the user set (the others are the table's defaults)."""

    model: str | None = None
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


class Chat:
    """One conversation. ``read(prompt)`` gives the next input line (None at its end; KeyboardInterrupt for
    Ctrl-C), ``write(text)`` shows text as it comes (``show`` makes a reply's text fit to show); ``loading(model)``
    is a context manager around a spawn that may wait for its model to load (a spinner on a terminal)."""

    def __init__(self, client: Client, settings: ChatSettings, read: Callable[[str], str | None],
                 write: Callable[[str], None], show: Callable[[str], str] = lambda t: t,
                 loading: Callable[[str | None], ContextManager[None]] = lambda _: contextlib.nullcontext()) -> None:
        self.client, self.settings = client, settings
        self.read, self.write, self.show, self.loading = read, write, show, loading
        self.messages: list[dict[str, str]] = []  # the turns (user, assistant), in order; the system prompt apart
        self.pid: int | None = None  # the session process holding the conversation's context; None: none yet
        self.stale = True  # the session does not match the settings: the next turn starts a fresh one
        self.turns = 0  # turns sent in this chat (every session's)
        self.last_pid: int | None = None

    def say(self, text: str) -> None:
        self.write(text + "\n")

    # -- the session -------------------------------------------------------------------------------
    def start(self) -> int:
        """Spawn the first session (the model loads now, so a bad name fails before any typing); its pid."""
        self._renew()
        assert self.pid is not None
        return self.pid

    def _renew(self) -> None:
        """End the session if any and spawn one from the settings, the conversation replayed as its messages."""
        self.end()
        s = self.settings
        history = ([{"role": "system", "content": s.system}] if s.system is not None else []) + self.messages
        try:
            with self.loading(s.model):
                self.pid = self.client.spawn(model=s.model, session=True, messages=history or None, **s.params)
        except LLMOSError as exc:
            if not history or not no_chat_template(exc):
                raise
            self.pid = self.client.spawn(model=s.model, session=True, **s.params)
            if self.messages or s.system is not None:
                self.say("[this model has no chat template: the system prompt and the conversation so far cannot "
                         "be given to it; it starts afresh]")
            self.messages = []
        self.stale = False
        self.last_pid = self.pid

    def end(self) -> None:
        """End the current session (its context goes; the conversation stays here)."""
        if self.pid is not None:
            pid, self.pid = self.pid, None
            try:
                self.client.close(pid)
            except NoSuchProcess:
                pass

    # -- a turn ------------------------------------------------------------------------------------
    def send(self, text: str) -> None:
        """Send one message and stream its reply; on Ctrl-C stop the reply (KeyboardInterrupt is not raised)."""
        if self.stale or self.pid is None:
            self._renew()
        assert self.pid is not None
        self.turns += 1
        got: list[str] = []
        turn = self.client.write_stream(self.pid, text)  # sends on the first iteration
        try:
            for chunk in turn:
                got.append(chunk)
                self.write(self.show(chunk))
        except LLMOSError:
            self.stale = True  # the session may be gone (ended, its model unloaded): the next turn starts one
            if got:
                self.write("\n")
            raise
        except KeyboardInterrupt:
            turn.close()
            self.end()  # the session ends with the reply: the next message replays the conversation
            self.stale = True
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(got)}]
            self.write("\n[reply stopped]\n")
            return
        self.write("\n")
        result = turn.result
        assert result is not None, "a write stream ends with the turn's result"
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": result.text}]
        if result.finish_reason == "error" and result.error:
            self.stale = True  # its session may be gone: the next turn starts one with the conversation
            raise error_from_errno(result.error["errno"], result.error["message"])

    # -- commands ----------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run one /command; False when it asks to leave. Raises InvalidArgument for bad arguments."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/?", "/help"):
            self.say(SHORTCUTS if rest == "shortcuts" else HELP)
        elif name == "/set":
            self._set(rest)
        elif name == "/system":
            if rest:
                self._set(f"system {rest}")
            else:
                self.say(self.describe("system"))
        elif name == "/unset":
            self._unset(rest)
        elif name == "/show":
            self.say(self.describe(rest))
        elif name == "/clear":
            self.messages = []
            self.stale = True
            self.end()
            self.say("Cleared session context")
        elif name == "/load":
            if not rest:
                raise InvalidArgument("/load needs a model: a directory, a name in the store, or default")
            old = self.settings.model
            self.settings.model = None if rest == "default" else rest
            try:
                self._renew()  # now, so that a bad name is said at once
            except LLMOSError:
                self.settings.model = old
                self.stale = True
                raise
            self.say(f"[session pid {self.pid} on {rest}]")
        else:
            raise InvalidArgument(f"unknown command {name!r}; type /? for help")
        return True

    def _set(self, rest: str) -> None:
        if not rest:
            self.say("\n".join(["Available parameters (/set NAME VALUE):", *(describe_setting(n) for n in SETTINGS),
                                "  system              the system prompt (/set system TEXT)"]))
            return
        what, _, value = rest.partition(" ")
        if what == "parameter":  # Ollama's long form: /set parameter NAME VALUE
            what, _, value = value.strip().partition(" ")
        if what == "system":
            if not value.strip():
                raise InvalidArgument("/set system needs the prompt's text (/unset system removes it)")
            self.settings.system = value.strip()
            self.stale = True
            self.say("Set system message.")
            return
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise InvalidArgument(f"/set {what}: {exc}") from None
        key, parsed = parse_setting(what, words)
        self.settings.params[key] = parsed
        self.stale = True
        self.say(f"Set parameter '{what}' to '{' '.join(words)}'")

    def _unset(self, rest: str) -> None:
        if rest == "system":
            self.settings.system = None
            self.say("Removed the system message.")
        elif rest.lower() in SETTINGS:
            self.settings.params.pop(SETTINGS[rest.lower()], None)
            self.say(f"Parameter '{rest}' is back to its default")
        else:
            raise InvalidArgument(f"/unset takes system or a parameter: {', '.join(SETTINGS)}")
        self.stale = True

    def describe(self, what: str = "") -> str:
        """/show's text: ``what`` is parameters, system, model, or '' for all of them."""
        if what not in ("", "parameters", "system", "model"):
            raise InvalidArgument(f"/show takes parameters, system or model, got {what!r}")
        s, lines = self.settings, []
        if what in ("", "model"):
            lines.append(f"model:    {typed_name(s.model) if s.model else 'default (the shipped default model)'}")
            session = f"pid {self.pid}" if self.pid is not None and not self.stale else \
                "a new one starts with the next message"
            lines.append(f"session:  {session}; {len(self.messages) // 2} turns in the conversation")
        if what in ("", "system"):
            lines.append(f"system:   {s.system!r}" if s.system is not None else "system:   (none)")
        if what in ("", "parameters"):
            lines.append("parameters:")
            for key in dict.fromkeys(SETTINGS.values()):
                if key in s.params:
                    v = s.params[key]
                    lines.append(f"  {key:<19} {' '.join(v) if isinstance(v, list) else v}")
                else:
                    lines.append(f"  {key:<19} {_default(key)} (default)")
        return "\n".join(lines)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Read messages and commands until /bye or the end of input; the session is ended on the way out (an
        exception included). Errors are one line each and the chat goes on. Returns the turns sent."""
        lines = Multiline()
        try:
            while True:
                try:
                    line = self.read("... " if lines.open else ">>> ")
                except KeyboardInterrupt:  # Ctrl-C at the prompt: the line (and an open block) is dropped
                    lines.cancel()
                    self.say("Use Ctrl-D or /bye to leave the chat.")
                    continue
                if line is None:
                    return self.turns
                got = lines.feed(line)
                if got is None:
                    continue
                text, quoted = got
                if not text.strip():
                    continue
                try:
                    if text.lstrip().startswith("/") and not quoted:
                        if not self.command(text.strip()):
                            return self.turns
                    else:
                        self.send(text)
                except LLMOSError as exc:
                    self.say(f"error: {exc}")
        finally:
            self.end()
