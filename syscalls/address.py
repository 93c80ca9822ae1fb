"""Where the kernel lives: $LLMOS_HOME and the bus address, resolved the same way by every party."""

from __future__ import annotations

import os
from pathlib import Path


def llmos_home() -> Path:
    """$LLMOS_HOME, or a per-user directory (~/.llmos)."""
    env = os.environ.get("LLMOS_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".llmos"


def run_dir(home: Path | None = None) -> Path:
    """The owner-only directory that holds the kernel's sockets, lock and pid files."""
    return (home or llmos_home()) / "run"


def default_address(home: Path | None = None) -> str:
    return f"ipc://{run_dir(home) / 'kernel.sock'}"


def resolve_address(address: str | None = None, home: Path | None = None) -> str:
    """An explicit address wins, then $LLMOS_ADDRESS, then the default under $LLMOS_HOME."""
    return address or os.environ.get("LLMOS_ADDRESS") or default_address(home)


def ipc_path(address: str) -> Path | None:
    """The filesystem path of an ipc:// address, None for other transports."""
    return Path(address[len("ipc://"):]) if address.startswith("ipc://") else None
