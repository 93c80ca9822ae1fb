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
from llmos.syscalls.errors import KernelUnavailable
from llmos.types import ProcessInfo, ProcessResult


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
        return self.client.spawn(prompt, messages, model or self.model, priority, **params)

    def wait(self, pid: int, timeout: float | None = None) -> ProcessResult:
        return self.client.wait(pid, timeout)

    def stream(self, pid: int) -> OutputStream:
        return self.client.stream(pid)

    def kill(self, pid: int, signal: str = "TERM") -> str:
        return self.client.kill(pid, signal)

    def ps(self) -> list[ProcessInfo]:
        return self.client.ps()

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
