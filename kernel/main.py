"""The kernel process entry point: claim the address, write the pid file, run the loop on uvloop.

``python -m llmos.kernel.main [--home H] [--address A] [--parent-pid P]`` runs in the
foreground; ``llmos kernel start`` launches it detached. One kernel per address: the lock is
an flock held for the kernel's life, so a second kernel reports the first instead of
replacing its ipc socket.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import uvloop

from llmos.kernel.config import add_flags, from_args
from llmos.kernel.kernel import Kernel
from llmos.kernel.log import get_logger
from llmos.syscalls.address import ipc_path, llmos_home, resolve_address

EXIT_BUSY = 3
log = get_logger("kernel")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "address": address}).encode())
    return fd


def prepare_home(home: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    run = home / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    os.chmod(run, 0o700)  # only the owner may reach the kernel's socket
    (home / "log").mkdir(exist_ok=True)
    return run


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llmos-kernel", description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None)
    ap.add_argument("--address", default=None)
    ap.add_argument("--parent-pid", type=int, default=None,
                    help="stop when this process (the program that embeds the kernel) exits")
    add_flags(ap)
    args = ap.parse_args(argv)
    config = from_args(args)

    home = Path(args.home).expanduser().resolve() if args.home else llmos_home()
    address = resolve_address(args.address, home)
    run = prepare_home(home)
    path = ipc_path(address)
    if path is not None and len(str(path)) > 100:
        print(f"llmos kernel: ipc path too long for a unix socket ({len(str(path))} > 100): {path}",
              file=sys.stderr)
        return 2
    fd = claim(run, address)
    if fd is None:
        other = read_lock(lock_path(run, address))
        print(f"llmos kernel: a kernel (pid {other.get('pid', '?')}) already serves {address}", file=sys.stderr)
        return EXIT_BUSY
    if args.parent_pid:
        try:  # Linux: be told at once when the embedding program dies
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)
        except OSError:
            pass
        if os.getppid() != args.parent_pid:
            return 0  # the parent is already gone
    pidfile = run / "kernel.pid"
    pidfile.write_text(str(os.getpid()))
    kernel = Kernel(home, address, config)
    try:
        uvloop.run(_run(kernel, args.parent_pid))
    finally:
        if path is not None and path.exists():
            path.unlink()
        if pidfile.exists() and pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
