"""The kernel process entry point: check the flags, claim the address, write the pid file, run the loop.

``python -m llmos.kernel.main [--home H] [--address A] [--parent-pid P] [kernel flags]`` runs in
the foreground; ``llmos kernel start`` launches it detached. One kernel per address: the lock is
an flock held for the kernel's life, so a second kernel reports the first instead of
replacing its ipc socket.

Exit codes: 0 stopped cleanly; 1 internal error (the traceback is in the log); 2 a bad flag,
setting, address or home (the message names it); 3 another kernel serves the address
(EXIT_BUSY); 4 the address is taken by another program (EXIT_ADDRINUSE). Every refusal is one
line on stderr that begins "llmos kernel".

Everything the kernel creates is owner-only (umask 077: dirs 0700, files 0600); the home, its
run/ and log/ and the logs in it are brought to those modes when LLMOS made them.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import sys
import traceback
from pathlib import Path

import uvloop
import zmq

from llmos.syscalls.address import resolve_address
from llmos.kernel.config import KernelConfig, add_flags, from_args, home_dir
from llmos.kernel.kernel import Kernel
from llmos.kernel.log import get_logger
from llmos.kernel.sharing import check_group, listen_plan
from llmos.syscalls.address import ipc_path, llmos_home
from llmos.syscalls.errors import Busy, DeviceError, InvalidArgument

EXIT_INTERNAL = 1
EXIT_CONFIG = 2
EXIT_BUSY = 3
EXIT_ADDRINUSE = 4
EXIT_UNAVAILABLE = 5  # a service the kernel needs (--ray's cluster) cannot be reached
HOME_ENTRIES = {"run", "log", "shell_history", "keys", "store"}  # what LLMOS itself puts in a home
_WORKER_SOCKET = re.compile(r"^worker-(\d+)-.*\.sock$")


def lock_path(run: Path, address: str) -> Path:
    path = ipc_path(address)
    if path is not None:
        return path.with_name(path.name + ".lock")
    return run / f"kernel-{hashlib.sha1(address.encode()).hexdigest()[:12]}.lock"


def read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def claim(run: Path, address: str) -> int | None:
    """Take the address's lock; return its fd, or None when another kernel holds it."""
    path = lock_path(run, address)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.fchmod(fd, 0o600)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "address": address}).encode())
    return fd


def _owner_only(path: Path, mode: int) -> None:
    if path.stat().st_mode & 0o777 != mode:
        os.chmod(path, mode)


def prepare_home(home: Path) -> Path:
    """Create the home, run/ and log/ owner-only, and bring what an earlier LLMOS made to those modes.

    The home itself is changed only when it is LLMOS's: the default ~/.llmos, one created now,
    or one that holds nothing but LLMOS's entries (a user's own directory keeps its mode).
    Returns run/.
    """
    created = not home.exists()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if created or home == Path.home() / ".llmos" or {p.name for p in home.iterdir()} <= HOME_ENTRIES:
        _owner_only(home, 0o700)
    run, log = home / "run", home / "log"
    for d in (run, log):
        d.mkdir(mode=0o700, exist_ok=True)
        _owner_only(d, 0o700)  # only the owner may reach the kernel's socket or read its logs
    for f in log.iterdir():
        if f.is_file() and f.stat().st_mode & 0o077:
            os.chmod(f, 0o600)  # logs of an earlier LLMOS that made them 0644: they quote prompts
    return run


def _is_kernel(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a socket named for our pid is a dead kernel's that had it: ours do not exist yet
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"llmos.kernel.main" in f.read()
    except OSError:
        return False


def remove_stale_sockets(run: Path) -> list[str]:
    """Unlink run/worker-<kernel pid>-*.sock left by kernels that are gone (killed before cleaning up)."""
    removed = []
    for p in run.iterdir():
        match = _WORKER_SOCKET.match(p.name)
        if match and not _is_kernel(int(match.group(1))):
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a process id, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a process id (1 or more), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llmos kernel", description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=home_dir, default=None, help="state directory (default: $LLMOS_HOME or ~/.llmos)")
    ap.add_argument("--address", default=None, help="bus address: ipc:///path or tcp://HOST:PORT "
                                                    "(default: $LLMOS_ADDRESS or ipc under HOME/run)")
    ap.add_argument("--parent-pid", type=_positive_int, default=None,
                    help="stop when this process (the program that embeds the kernel) exits")
    add_flags(ap)
    return ap


def _refuse(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"llmos kernel: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # before anything is created: sockets, logs, pid file and workers' files are owner-only
    args = build_parser().parse_args(argv)  # a bad flag: argparse names it and exits with code 2
    try:
        config = from_args(args)
    except ValueError as exc:
        return _refuse(str(exc))
    try:
        return _serve(args, config)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # the last resort: one line for the user, the traceback for the log
        get_logger("kernel").error("internal_error", error=repr(exc), traceback=traceback.format_exc())
        return _refuse(f"internal error: {type(exc).__name__}: {exc} (a bug; the traceback is in the log above)",
                       EXIT_INTERNAL)


def _serve(args: argparse.Namespace, config: KernelConfig) -> int:
    home = Path(args.home).expanduser().resolve() if args.home else llmos_home()
    try:
        address = resolve_address(args.address, home if args.home else None)
    except InvalidArgument as exc:
        return _refuse(exc.message)
    try:
        listen_plan(address, config)  # tcp without CURVE off the loopback, an address twice: refused here
        check_group(config.group)
    except InvalidArgument as exc:
        return _refuse(exc.message)
    try:
        run = prepare_home(home)
    except OSError as exc:
        return _refuse(f"cannot use {home} as the home: {exc.strerror or exc}")
    fd = claim(run, address)
    if fd is None:
        other = read_lock(lock_path(run, address))
        return _refuse(f"a kernel (pid {other.get('pid', '?')}) already serves {address}", EXIT_BUSY)
    log = get_logger("kernel")
    stale = remove_stale_sockets(run)
    if stale:
        log.info("stale_sockets_removed", count=len(stale))
    if args.parent_pid:
        try:  # Linux: be told at once when the embedding program dies
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
        except OSError:
            pass
        if os.getppid() != args.parent_pid:
            return 0  # the parent is already gone
    pidfile = run / "kernel.pid"
    pid_fd = os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(pid_fd, 0o600)
    os.write(pid_fd, str(os.getpid()).encode())
    os.close(pid_fd)
    path = ipc_path(address)
    kernel = Kernel(home, address, config)
    try:
        uvloop.run(_run(kernel, args.parent_pid))
    except Busy as exc:  # the metrics port is taken
        return _refuse(exc.message, EXIT_ADDRINUSE)
    except DeviceError as exc:  # --ray: Ray could not be started or joined
        return _refuse(exc.message, EXIT_UNAVAILABLE)
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EADDRINUSE:
            return _refuse(f"{' or '.join(a for a, _ in listen_plan(address, config))} is in use by another "
                           f"program (EADDRINUSE); stop it or choose another --address / --listen", EXIT_ADDRINUSE)
        if exc.errno in (zmq.EADDRNOTAVAIL, zmq.ENODEV, errno.EACCES):
            return _refuse(f"cannot listen on {address}: {exc.strerror}")
        raise
    finally:
        if path is not None and path.exists():
            path.unlink()
        if pidfile.exists() and pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()
        os.close(fd)
    return 0


async def _watch_parent(kernel: Kernel, parent: int) -> None:
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != parent:
            kernel.request_shutdown(f"parent process {parent} exited")
            return


async def _run(kernel: Kernel, parent: int | None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, kernel.request_shutdown, f"signal {signal.Signals(sig).name}")
    if parent:
        loop.create_task(_watch_parent(kernel, parent))
    await kernel.serve()


if __name__ == "__main__":
    sys.exit(main())
