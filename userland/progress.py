"""Progress on stderr for people: rich progress bars (bytes or records) and a spinner naming the stage.

Both draw only when their stream is a terminal (``isatty``): piped or redirected, a command's stderr
carries only its messages, and a program reading it sees no control codes. The spinner is transient:
``stop()`` erases it, so the caller can print (the first token of ``llmos run``) on a clean line.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

Update = Callable[..., None]  # update(done, total, *ignored): the store's and eval's progress callbacks
POLL_S = 0.25  # how often a spinner asks for its stage: a kernel call each time, so not every frame


def on_terminal(stream: Any) -> bool:
    """True when ``stream`` is a terminal (progress is drawn only there)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _console(stream: TextIO) -> Any:
    from rich.console import Console

    # the caller checked the stream is a terminal; rich's own check also heeds FORCE_COLOR/TERM=dumb
    return Console(file=stream, force_terminal=True, highlight=False)


@contextmanager
def progress_bar(what: str, unit: str = "bytes", stream: TextIO | None = None) -> Iterator[Update]:
    """A rich progress bar on ``stream`` (default stderr; nothing unless it is a terminal); yields
    ``update(done, total, *_)``: ``done`` and ``total`` in bytes (unit "bytes": size and speed shown) or
    in items (any other unit: "N/M"); ``total`` None while unknown (the bar pulses)."""
    import sys

    stream = stream if stream is not None else sys.stderr
    if not on_terminal(stream):
        yield lambda *_: None
        return
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    counts = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn(),
                                                                                TextColumn(unit)]
    with Progress(TextColumn("{task.description}"), BarColumn(), *counts, TimeRemainingColumn(),
                  console=_console(stream), transient=False) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int | None, *_: Any) -> None:
            bar.update(task, completed=done, total=total)

        yield update


class Spinner:
    """A spinner and the current stage on ``stream`` (default stderr), with the seconds it has lasted.

    ``Spinner("connecting", poll=f)``: while it runs, a thread calls ``f()`` every POLL_S seconds and shows
    the stage it returns (None: keep the last one; an exception: keep it too, the work it watches says
    what went wrong). ``stage(text)`` sets it from the caller. Nothing is drawn and ``poll`` is never
    called unless the stream is a terminal. ``stop()`` (or leaving the ``with``) erases the line and
    waits for the thread; ``print(text)`` prints above the spinner (plainly when it is off).
    """

    def __init__(self, stage: str, poll: Callable[[], str | None] | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import sys

        self.stream = stream if stream is not None else sys.stderr
        self.on = on_terminal(self.stream)
        self.text = stage
        self.poll = poll
        self.clock = clock
        self._since = clock()
        self._status: Any = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Spinner":
        if not self.on or self._status is not None:
            return self
        from rich.status import Status

        self._status = Status(self._line(), console=_console(self.stream), spinner="dots")
        self._status.start()
        if self.poll is not None:
            self._thread = threading.Thread(target=self._watch, name="llmos-spinner", daemon=True)
            self._thread.start()
        return self

    def _line(self) -> str:
        return f"{self.text} ({self.clock() - self._since:.0f} s)"

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            try:
                said = self.poll() if self.poll is not None else None
            except Exception:  # a failed look is not the command's failure: the call it watches reports that
                said = None
            if said and not self._stopped.is_set():
                self.text = said
            if not self._stopped.is_set():
                self._status.update(self._line())

    def stage(self, text: str) -> None:
        """Show ``text`` as the stage now."""
        self.text = text
        if self._status is not None and not self._stopped.is_set():
            self._status.update(self._line())

    def print(self, text: str) -> None:
        """A line on the stream, above the spinner while it runs."""
        if self._status is not None and not self._stopped.is_set():
            self._status.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def stop(self) -> None:
        """Erase the spinner and end its thread (safe to call twice, or on one never started)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)  # a poll in flight is one kernel call, with its finite timeout
            self._thread = None
        if self._status is not None:
            self._status.stop()  # transient: the line is erased
            self._status = None

    def __enter__(self) -> "Spinner":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class LoadBar:
    """A rich progress bar of a model load on ``stream`` (default stderr), in load stages: every instance
    passes LOAD_STAGES (drivers/model/protocol.py) and is done once ready, so ``llmos load`` of N instances
    counts 4N stages. ``poll()`` (a thread calls it every POLL_S seconds) returns (stages done, stages in all,
    the text to show) or None (nothing known yet: the bar pulses). Like the Spinner: nothing is drawn and
    ``poll`` is never called unless the stream is a terminal, and ``stop()`` erases the bar."""

    def __init__(self, what: str, poll: Callable[[], tuple[int, int, str] | None],
                 stream: TextIO | None = None) -> None:
        import sys

        self.stream = stream if stream is not None else sys.stderr
        self.on = on_terminal(self.stream)
        self.what, self.poll = what, poll
        self._bar: Any = None
        self._task: Any = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "LoadBar":
        if not self.on or self._bar is not None:
            return self
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("stages"), TimeElapsedColumn(), console=_console(self.stream),
                             transient=True)
        self._bar.start()
        self._task = self._bar.add_task(self.what, total=None)
        self._thread = threading.Thread(target=self._watch, name="llmos-load-bar", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stopped.wait(POLL_S):
            try:
                said = self.poll()
            except Exception:  # a failed look is not the command's failure: the load call reports that
                said = None
            if said and not self._stopped.is_set():
                done, total, text = said
                self._bar.update(self._task, completed=done, total=total, description=text)

    def stop(self) -> None:
        """Erase the bar and end its thread (safe to call twice, or on one never started)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "LoadBar":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def load_progress(info: dict[str, Any], fallback: str | None = None) -> tuple[int, int, str] | None:
    """A model_info reply as LoadBar's (stages done, stages in all, text); None before the model has
    instances (the load has not reached the kernel's model table yet)."""
    from llmos.drivers.model.protocol import LOAD_STAGES

    exs = info.get("executors") or []
    if not exs:
        return None
    n = len(LOAD_STAGES)
    done = sum(n if ex.get("ready") else LOAD_STAGES.index(ex["stage"]) if ex.get("stage") in LOAD_STAGES else 0
               for ex in exs)
    return done, n * len(exs), model_stage(info, fallback, ready="ready")


# -- what a command waits for, as a stage -------------------------------------------------------------------
def model_name(model: str | None) -> str:
    """A model as people name it: a store model's name, a directory's last part, 'default' for None."""
    if not model:
        return "default"
    return model.removeprefix("store:").rstrip("/").rsplit("/", 1)[-1] or model


def model_stage(info: dict[str, Any], fallback: str | None = None, ready: str = "starting the process") -> str:
    """The stage of a call waiting for ``info``'s model (a model_info reply): loading the model, with the load
    stage its instances report (e.g. 'reading weights'), or ``ready`` once every instance is ready."""
    name = model_name(info.get("model") or fallback)
    exs = info.get("executors") or []
    if info.get("loaded") and exs and all(ex.get("ready") for ex in exs):
        return ready
    stages = sorted({ex["stage"] for ex in exs if ex.get("stage") and not ex.get("ready")})
    return f"loading model {name}" + (f": {', '.join(stages)}" if stages else "")


def process_stage(state: str, prompt_tokens: int = 0, output_tokens: int = 0, pid: int | None = None) -> str:
    """The stage of a spawned process before its first token: in the run queue, computing its prompt
    (prefill), or STOPPED (and how to resume it)."""
    if state in ("NEW", "READY"):
        return "waiting in queue"
    if state == "RUNNING":
        return f"prefill ({prompt_tokens} prompt tokens)" if output_tokens == 0 else "generating"
    if state == "STOPPED":
        return f"stopped (llmos cont {pid} resumes it)" if pid is not None else "stopped"
    return state.lower()


class Stages:
    """``poll`` for a Spinner over a spawn: what the kernel says the caller waits for, read on a connection of
    its own (a Client is not thread-safe), opened by ``connect()`` at the first look and closed by ``close()``.

    The caller says where it is: ``spawning`` while its spawn call is in flight (the model may be loading),
    then ``pid`` once it has one. Before either, there is nothing to ask the kernel (None).
    """

    def __init__(self, connect: Callable[[], Any], model: str | None, spawning: bool = False,
                 ready: str = "starting the process") -> None:
        self.connect, self.model, self.ready = connect, model, ready
        self.spawning = spawning
        self.pid: int | None = None
        self._client: Any = None
        self._lock = threading.Lock()  # close() from the main thread while the spinner's thread may look

    def __call__(self) -> str | None:
        with self._lock:
            if self.pid is None and not self.spawning:
                return None
            if self._client is None:
                self._client = self.connect()
            if self.pid is None:
                return model_stage(self._client.model_info(self.model), self.model, self.ready)
            p = self._client.stat(self.pid)
            return process_stage(p.state, p.prompt_tokens, p.output_tokens, self.pid)

    def load(self) -> tuple[int, int, str] | None:
        """``poll`` for a LoadBar: the model's load stages (load_progress), on this object's connection."""
        with self._lock:
            if self._client is None:
                self._client = self.connect()
            return load_progress(self._client.model_info(self.model), self.model)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
