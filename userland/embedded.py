"""Start and stop a kernel process on behalf of a program (the embedded kernel, and the daemon).

An embedded kernel is a child of the program, started with ``--parent-pid`` so it stops when
the program exits however it exits; the daemon is started in a new session and outlives its
starter. Both log to $LLMOS_HOME/log/kernel.log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmos.client import Client
from llmos.syscalls.address import llmos_home, resolve_address
from llmos.syscalls.errors import KernelUnavailable, LLMOSError

EXIT_BUSY = 3  # the kernel found another kernel on the address (llmos.kernel.main.EXIT_BUSY)


def try_connect(address: str, timeout: float = 2.0) -> Client | None:
    try:
        return Client(address, connect_timeout=timeout)
    except KernelUnavailable:
        return None


def launch(address: str | None = None, home: Path | None = None, *, embedded: bool,
           timeout: float = 60.0, extra: list[str] | None = None) -> tuple[subprocess.Popen | None, Client]:
    """Start a kernel and return (its process, a connected client).

    If another kernel wins the address first, connect to that one and return (None, client).
    """
    home = home or llmos_home()
    address = resolve_address(address, home)
    (home / "log").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "llmos.kernel.main", "--home", str(home), "--address", address]
    if embedded:
        cmd += ["--parent-pid", str(os.getpid())]
    cmd += extra or []
    with open(home / "log" / "kernel.log", "ab") as log:
        # always a session of its own: Ctrl-C in the program's terminal is the program's, not the kernel's
        # (an embedded kernel still stops with its parent: --parent-pid)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            client = try_connect(address)
            if code == EXIT_BUSY and client is not None:
                return None, client
            raise KernelUnavailable(f"kernel exited with code {code} before answering; see {home}/log/kernel.log")
        client = try_connect(address, timeout=1.0)
        if client is not None:
            return proc, client
        time.sleep(0.05)
    proc.kill()
    raise KernelUnavailable(f"kernel did not answer at {address} within {timeout} s")


def stop(client: Client, proc: subprocess.Popen | None, pid: int | None = None, timeout: float = 30.0) -> None:
    """Ask the kernel to shut down, wait for it to exit, and make sure it did."""
    pid = pid or (proc.pid if proc else client.kernel.get("pid"))
    try:
        client.shutdown()
    except LLMOSError:
        pass
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif pid is None or not _alive(pid):
            return
        time.sleep(0.05)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc is not None:
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of someone else still "exists"; look at its state
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
