"""Tab completion for llmos-shell: commands, pids, model names, signals, store paths, and chat's /commands.

What needs the kernel (pids from ``ps``, models loaded and in the store's /models, a directory's entries) is
fetched only when Tab asks for it, and kept ``ttl`` seconds so that Tab pressed again answers at once. A
completion never breaks the prompt: a failed fetch completes nothing.
"""

from __future__ import annotations

import time
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from llmos.syscalls.table import SIGNALS

T = TypeVar("T")

PID_COMMANDS = ("kill", "stop", "cont", "nice", "wait", "stat")
MODEL_COMMANDS = ("chat", "load", "unload")
PATH_COMMANDS = ("ls", "cat")
# options that take a value: the word after one is that value, not a positional argument
VALUE_FLAGS = frozenset({"--model", "-n", "--max-new-tokens", "-p", "--priority", "--temperature", "--top-p",
                         "--top-k", "--seed", "--stop", "--deadline", "--queue-timeout", "--system", "-s", "--signal",
                         "--limit", "--device", "--instances", "--keep-alive", "--kv-policy", "--kv-blocks",
                         "--max-batch", "--engine", "-d", "--delay", "--iterations"})


class Cached(Generic[T]):
    """``fetch()``'s last answer, kept ``ttl`` seconds (``clock``: monotonic seconds); an empty answer when
    the fetch fails (the kernel gone or busy: a completion is a convenience, the prompt must stay)."""

    def __init__(self, fetch: Callable[[], list[T]], ttl: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fetch, self.ttl, self.clock = fetch, ttl, clock
        self._at: float | None = None
        self._value: list[T] = []

    def get(self) -> list[T]:
        now = self.clock()
        if self._at is None or now - self._at > self.ttl:
            try:
                self._value = self.fetch()
            except Exception:  # noqa: BLE001 - any failure: nothing to complete, never a broken prompt
                self._value = []
            self._at = now
        return self._value


def _words(text: str) -> tuple[list[str], str]:
    """The words before the cursor that are complete, and the one being typed ('' after a space)."""
    words = text.split()
    if not text or text[-1].isspace():
        return words, ""
    return words[:-1], words[-1]


def _positional(args: list[str]) -> int:
    """How many positional arguments ``args`` (the words after the command) hold."""
    n, skip = 0, False
    for w in args:
        if skip:
            skip = False
        elif w.startswith("-"):
            skip = w in VALUE_FLAGS
        else:
            n += 1
    return n


def _matching(word: str, items: Iterable[tuple[str, str]]) -> Iterator[Completion]:
    for text, meta in items:
        if text.startswith(word):
            yield Completion(text, start_position=-len(word), display_meta=meta)


class ShellCompleter(Completer):
    """Completes the shell's command lines.

    ``commands``: name -> one-line description. ``pids()``: (pid, description) of the processes ``ps`` shows;
    ``models()``: (name, description) of the models one may name; ``entries(directory)``: (name, is_dir) in a
    directory of the store's namespace. Each is called at most once per ``ttl`` seconds (per directory).
    """

    def __init__(self, commands: dict[str, str], pids: Callable[[], list[tuple[int, str]]],
                 models: Callable[[], list[tuple[str, str]]],
                 entries: Callable[[str], list[tuple[str, bool]]] | None = None, ttl: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.commands = commands
        self.pids = Cached(pids, ttl, clock)
        self.models = Cached(models, ttl, clock)
        self._entries = entries
        self._dirs: dict[str, Cached[tuple[str, bool]]] = {}
        self.ttl, self.clock = ttl, clock

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        done, word = _words(document.text_before_cursor)
        if not done:
            yield from _matching(word, sorted(self.commands.items()))
            return
        cmd, args = done[0], done[1:]
        if args and args[-1] in ("--model",):
            yield from self.model_completions(word)
        elif word.startswith("-") or (args and args[-1] in VALUE_FLAGS):
            return  # an option, or the value of one: nothing to offer
        elif cmd in PID_COMMANDS and _positional(args) == 0:
            yield from self.pid_completions(word)
        elif cmd == "kill" and _positional(args) == 1:
            yield from _matching(word.upper(), ((s, "signal") for s in SIGNALS))
        elif cmd in MODEL_COMMANDS and _positional(args) == 0:
            yield from self.model_completions(word)
        elif cmd in PATH_COMMANDS and _positional(args) == 0:
            yield from self.path_completions(word)

    def pid_completions(self, word: str) -> Iterator[Completion]:
        yield from _matching(word, ((str(pid), what) for pid, what in self.pids.get()))

    def model_completions(self, word: str) -> Iterator[Completion]:
        yield from _matching(word, self.models.get())

    def path_completions(self, word: str) -> Iterator[Completion]:
        """Absolute paths of the namespace, one directory level at a time (a directory ends in '/')."""
        if self._entries is None or (word and not word.startswith("/")):
            return
        parent = word.rsplit("/", 1)[0] + "/" if word else "/"
        directory = parent.rstrip("/") or "/"
        if directory not in self._dirs:
            entries = self._entries
            self._dirs[directory] = Cached(lambda: entries(directory), self.ttl, self.clock)
        yield from _matching(word, ((parent + name + ("/" if is_dir else ""), "dir" if is_dir else "file")
                                    for name, is_dir in self._dirs[directory].get()))


class ChatCompleter(Completer):
    """Completes chat's /commands, the names /set and /unset take, and the model /load takes (``models`` as
    for ShellCompleter: a Cached shared with it). Plain messages are not completed."""

    def __init__(self, commands: dict[str, str], settings: dict[str, str], models: Cached[tuple[str, str]]) -> None:
        self.commands, self.settings, self.models = commands, settings, models

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        done, word = _words(text)
        if not done:
            yield from _matching(word, sorted(self.commands.items()))
        elif done[0] in ("/set", "/unset") and (len(done) == 1 or done[1:] == ["parameter"]):
            names = {"system": "the system prompt", **self.settings} if done[0] == "/set" or len(done) == 1 \
                else self.settings
            yield from _matching(word, sorted(names.items()))
        elif done[0] == "/load" and len(done) == 1:
            yield from _matching(word, self.models.get())
        elif done[0] == "/show" and len(done) == 1:
            yield from _matching(word, (("parameters", "sampling settings"), ("system", "the system prompt"),
                                        ("model", "the model and session")))
