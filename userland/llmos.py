"""LLMOS: the friendly entry point. Connects to a running kernel, or embeds one for this program."""

from __future__ import annotations

import atexit
import os
import subprocess
import weakref
from pathlib import Path
from typing import Any

from llmos import embedded
from llmos._wire import text_or_raise
from llmos.syscalls.address import resolve_address
from llmos.client import Client, OutputStream
from llmos.fs import FS
from llmos.session import Session
from llmos.syscalls.errors import KernelUnavailable
from llmos.types import ProcessInfo, ProcessResult, TurnResult


class LLMOS:
    """A program's handle on LLMOS.

    ``LLMOS(model_path=None, address=None, home=None)`` connects to the kernel at ``address``
    (else the default address under ``home``, else $LLMOS_ADDRESS, else the default under
    $LLMOS_HOME). When none answers it starts an embedded kernel with that home, which stops
    when this object is closed or the program exits. ``model_path`` is the default model for
    this handle's calls; None means the kernel's shipped default model.

    Raises InvalidArgument for an address no kernel could use, KernelUnavailable when none
    answers and ``start_kernel`` is False or the embedded kernel cannot start (its message
    quotes the kernel's own).
    """

    def __init__(self, model_path: str | None = None, address: str | None = None, *,
                 home: str | os.PathLike | None = None, start_kernel: bool = True) -> None:
        self.model = model_path
        self.home = Path(home).expanduser().resolve() if home is not None else None
        self.address = resolve_address(address, self.home)
        self._proc: subprocess.Popen | None = None
        client = embedded.try_connect(self.address)
        if client is None:
            if not start_kernel:
                raise KernelUnavailable(f"no kernel answers at {self.address}")
            self._proc, client = embedded.launch(self.address, self.home, embedded=True)
        self.client: Client = client
        self._finalizer = weakref.finalize(self, _shutdown, client, self._proc)
        atexit.register(self._finalizer)

    @property
    def embedded(self) -> bool:
        """True when this object started (and will stop) the kernel it talks to."""
        return self._proc is not None

    def generate_text(self, prompt: str, **params: Any) -> str:
        """Generate a continuation of ``prompt`` and return its text."""
        pid = self.spawn(prompt=prompt, **params)
        return text_or_raise(self.wait(pid))

    def spawn(self, prompt: str | None = None, messages: list[dict] | None = None, model: str | None = None,
              priority: int = 0, **params: Any) -> int:
        """Start a process on ``model`` (default: this handle's); arguments and errors as Client.spawn."""
        return self.client.spawn(prompt, messages, model or self.model, priority, **params)

    def session(self, model: str | None = None, system: str | None = None, **sampling: Any) -> Session:
        """A conversation that keeps its context between turns, closed when the ``with`` ends (also on an
        exception): ``with os.session(system="Be brief.", temperature=0) as s: s.send("hi") -> str``;
        ``s.stream("hi")`` yields text chunks; ``s.last`` is the last TurnResult; ``s.pid`` its process.

        ``system`` goes as a system message to a model with a chat template; a model without one starts
        with no prompt. ``sampling``: spawn's fields (max_new_tokens, temperature, seed, deadline...).
        Raises as Client.spawn (EAGAIN/EDQUOT/EBUSY when a quota or the run queue is full).
        """
        return Session(self.client, model or self.model, system, **sampling)

    def wait(self, pid: int, timeout: float | None = None) -> ProcessResult:
        return self.client.wait(pid, timeout)

    def stream(self, pid: int) -> OutputStream:
        return self.client.stream(pid)

    def kill(self, pid: int, signal: str = "TERM") -> str:
        """Send TERM, KILL, STOP or CONT; returns the state after delivery (as Client.kill)."""
        return self.client.kill(pid, signal)

    def stop(self, pid: int) -> str:
        """Suspend a process (STOP): it leaves the batch, keeping its place; returns its state."""
        return self.client.stop(pid)

    def cont(self, pid: int) -> str:
        """Resume a STOPPED process (CONT) exactly where it was; returns its state."""
        return self.client.cont(pid)

    def nice(self, pid: int, priority: int) -> dict[str, Any]:
        """Renice a live process (-20..19; below 0 only root); returns {pid, priority, state}."""
        return self.client.nice(pid, priority)

    def write(self, pid: int, content: str, role: str = "user") -> TurnResult:
        """Send a session its next turn and return the reply's TurnResult (as Client.write)."""
        return self.client.write(pid, content, role)

    def ps(self) -> list[ProcessInfo]:
        return self.client.ps()

    def capture(self, pid: int, kind: str, layer: int) -> Any:
        """The tensor process ``pid`` captured (``spawn(..., capture=["attentions", "hidden_states"])``), as a
        numpy float32 array: hidden_states [tokens, hidden] (layer 0..L), attentions [tokens, heads, tokens]
        (layer 0..L-1); shapes, layers and errors as Client.capture."""
        return self.client.capture(pid, kind, layer)

    @property
    def fs(self) -> "FS":
        """The namespace: ``os.fs.put("/home/me/notes", b"...")``, ``get(path, offset, length)``, ``open(path)``,
        ``ls(path)``, ``stat(path)``, ``rm(path, recursive)``, ``exists(path)`` (llmos.fs.FS, as Client.fs)."""
        return self.client.fs

    def close(self) -> None:
        """Disconnect; stop the kernel if this object embedded it. Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> "LLMOS":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _shutdown(client: Client, proc: subprocess.Popen | None) -> None:
    if proc is not None:
        embedded.stop(client, proc)
    else:
        client.close()
