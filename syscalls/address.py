"""Where the kernel lives: $LLMOS_HOME and the bus address, resolved the same way by every party."""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmos.syscalls.errors import InvalidArgument


def llmos_home() -> Path:
    """$LLMOS_HOME, or a per-user directory (~/.llmos)."""
    env = os.environ.get("LLMOS_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".llmos"


def run_dir(home: Path | None = None) -> Path:
    """The owner-only directory that holds the kernel's sockets, lock and pid files."""
    return (home or llmos_home()) / "run"


def default_address(home: Path | None = None) -> str:
    return f"ipc://{run_dir(home) / 'kernel.sock'}"


IPC_PATH_MAX = 100  # bytes; a unix socket path must fit sockaddr_un.sun_path (108 on Linux) with room to spare
_HOST = re.compile(r"^(\*|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])$")
ADDRESS_FORMS = "ipc:///absolute/path or tcp://HOST:PORT (HOST a name, an IPv4 address, [IPv6] or *)"


def check_address(address: str, source: str = "address") -> str:
    """Return ``address`` if it is one the bus can use, else raise InvalidArgument naming ``source``.

    Accepted: ``ipc://`` with an absolute path of at most IPC_PATH_MAX bytes, and ``tcp://HOST:PORT``
    with PORT in 1..65535 (``*`` as HOST: every interface for a kernel, the loopback for a client).
    """
    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(f"invalid kernel address {address[:200]!r} ({source}): {why}; expected {ADDRESS_FORMS}")

    if not isinstance(address, str) or not address:
        raise bad("it is empty")
    scheme, sep, rest = address.partition("://")
    if not sep:
        raise bad("no transport")
    if scheme == "ipc":
        if not rest.startswith("/"):
            raise bad("an ipc path must be absolute (the kernel and its clients run in other directories)")
        if len(rest.encode()) > IPC_PATH_MAX:
            raise bad(f"the ipc path is {len(rest.encode())} bytes, longer than a unix socket allows "
                      f"({IPC_PATH_MAX}); choose a shorter $LLMOS_HOME or a tcp address")
        return address
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise bad("a tcp address needs a port in 1..65535")
        if not _HOST.match(host):
            raise bad(f"{host!r} is not a host name or address")
        return address
    raise bad(f"unknown transport {scheme!r}")


def resolve_address(address: str | None = None, home: Path | str | None = None) -> str:
    """The bus address a party should use, checked (InvalidArgument names where a bad one came from).

    An explicit ``address`` wins; then the default address under an explicit ``home`` (a command
    line's --home beats the environment's $LLMOS_ADDRESS); then $LLMOS_ADDRESS; then the default under $LLMOS_HOME.
    """
    if address:
        return check_address(address, "the address given")
    if home is not None:
        path = Path(home).expanduser().resolve()
        return check_address(default_address(path), f"the default socket under home {home}")
    env = os.environ.get("LLMOS_ADDRESS")
    if env:
        return check_address(env, "$LLMOS_ADDRESS")
    return check_address(default_address(llmos_home()), "the default socket under $LLMOS_HOME")


def connect_address(address: str) -> str:
    """Where a client connects for ``address``: a kernel listening on every interface (tcp://*) is reached
    on the loopback."""
    return "tcp://127.0.0.1:" + address.rpartition(":")[2] if address.startswith("tcp://*:") else address


def ipc_path(address: str) -> Path | None:
    """The filesystem path of an ipc:// address, None for other transports."""
    return Path(address[len("ipc://"):]) if address.startswith("ipc://") else None
