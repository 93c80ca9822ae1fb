"""Start and stop a kernel process on behalf of a program (the embedded kernel, and the daemon).

An embedded kernel is a child of the program, started with ``--parent-pid`` so it stops when
the program exits however it exits; the daemon is started in a new session and outlives its
starter. Both log to $LLMOS_HOME/log/kernel.log (owner-only, like everything under the home).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any
from pathlib import Path

from llmos.syscalls.address import resolve_address
from llmos.client import Client
from llmos.syscalls.address import llmos_home
from llmos.syscalls.errors import KernelUnavailable, LLMOSError, NotPermitted

EXIT_BUSY = 3  # the kernel found another kernel on the address (llmos.kernel.main.EXIT_BUSY)
LOG_TAIL_LINES = 5


class KernelExited(KernelUnavailable):
    """Raised by ``launch`` when the kernel process exited before answering; ``code`` is its exit code
    (2: a bad flag or setting, 4: the address is in use; llmos.kernel.main) and the message ends
    with the last lines it wrote to its log."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def try_connect(address: str, timeout: float = 2.0, **keys: Any) -> Client | None:
    try:
        return Client(address, connect_timeout=timeout, **keys)
    except KernelUnavailable:
        return None


def own_keys(home: Path, address: str) -> dict[str, str] | None:
    """The keys with which the kernel's owner reaches its kernel of ``home`` at a tcp ``address`` (the ones the
    kernel made on its first start); {} for ipc or an --insecure client; None while the kernel has not made
    them yet."""
    if not address.startswith("tcp://") or os.environ.get("LLMOS_INSECURE", "") not in ("", "0"):
        return {}
    server, client = home / "keys" / "kernel.key", home / "keys" / "client.key_secret"
    if not (server.is_file() and client.is_file()):
        return None
    return {"server_key": str(server), "client_key": str(client)}


def launch(address: str | None = None, home: Path | None = None, *, embedded: bool,
           timeout: float = 60.0, extra: list[str] | None = None) -> tuple[subprocess.Popen | None, Client]:
    """Start a kernel for ``home`` (default $LLMOS_HOME) and return (its process, a connected client).

    If another kernel wins the address first, connect to that one and return (None, client).
    Raises KernelExited (with the kernel's own last log lines) when the kernel exits before
    answering, KernelUnavailable when it does not answer within ``timeout`` seconds, and
    InvalidArgument for an address no kernel could serve.
    """
    address = resolve_address(address, home)  # the same order as every other party: home only when given
    home = Path(home).expanduser().resolve() if home is not None else llmos_home()
    log_path = open_log(home)
    start = log_path.stat().st_size  # only what this kernel writes is quoted back
    cmd = [sys.executable, "-m", "llmos.kernel.main", "--home", str(home), "--address", address]
    if embedded:
        cmd += ["--parent-pid", str(os.getpid())]
    cmd += extra or []
    with open(log_path, "ab") as log:
        # always a session of its own: Ctrl-C in the program's terminal is the program's, not the kernel's
        # (an embedded kernel still stops with its parent: --parent-pid)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        keys = own_keys(home, address)
        if code is not None:
            client = try_connect(address, **(keys or {})) if code == EXIT_BUSY else None
            if client is not None:
                return None, client
            said = log_tail(log_path, start)
            raise KernelExited(f"kernel exited with code {code} before answering"
                               + (f": {said}" if said else "") + f" (log: {log_path})", code)
        client = try_connect(address, timeout=1.0, **keys) if keys is not None else None
        if client is not None:
            if client.kernel.get("pid") == proc.pid:
                return proc, client
            # another kernel answers at the address (it won a race with ours, which will find the address
            # taken and exit): use that one, and never treat it as ours to stop
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return None, client
        time.sleep(0.05)
    proc.kill()
    raise KernelUnavailable(f"kernel did not answer at {address} within {timeout} s")


def open_log(home: Path) -> Path:
    """Create (owner-only) ``home``, ``home/log`` and ``home/log/kernel.log`` if missing; return the log's path.

    Modes are set explicitly, whatever the program's umask: the log quotes prompts and paths.
    """
    log_dir = home / "log"
    for d in (home, log_dir):
        if not d.is_dir():
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)  # mkdir's mode is masked by the umask
    if log_dir.stat().st_mode & 0o077:
        os.chmod(log_dir, 0o700)  # a log/ of an older LLMOS that made it 0755
    path = log_dir / "kernel.log"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return path


def log_tail(path: Path, start: int = 0, lines: int = LOG_TAIL_LINES, limit: int = 8000) -> str:
    """What a kernel that exited said in ``path`` after byte ``start``: its own messages (lines that begin
    "llmos kernel"), else its last ``lines`` non-empty lines; joined by " | "."""
    try:
        with open(path, "rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    said = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join([ln for ln in said if ln.startswith("llmos kernel")][-lines:] or said[-lines:])


def stop(client: Client, proc: subprocess.Popen | None, pid: int | None = None, timeout: float = 30.0) -> None:
    """Ask the kernel to shut down, wait for it to exit, and make sure it did.

    NotPermitted (EPERM) when the caller is not the kernel's admin: nothing is stopped. A kernel on this
    machine (our child ``proc``, or an ipc kernel whose ``pid`` is a kernel process) that does not exit within
    ``timeout`` s is killed; a kernel reached over tcp is only waited for (its pid means nothing here)."""
    address = client.address
    local = proc is not None or address.startswith("ipc://")
    pid = pid or (proc.pid if proc else client.kernel.get("pid"))
    try:
        client.shutdown()
    except NotPermitted:
        raise
    except LLMOSError:
        pass
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not local:
            if try_connect(address, timeout=1.0) is None:
                return
        elif pid is None or not _alive(pid):
            return
        time.sleep(0.05)
    if pid and local and (proc is not None or _is_kernel(pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc is not None:
        proc.wait()


def _is_kernel(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"llmos.kernel.main" in f.read()
    except OSError:
        return False


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
