"""Client-side protocol logic shared by Client and AsyncClient: requests, frame interpretation."""

from __future__ import annotations

import getpass
import itertools
import os
import re
from pathlib import Path
from typing import Any

from llmos.syscalls import codec, protocol
from llmos.syscalls.address import default_address, llmos_home
from llmos.syscalls.errors import InvalidArgument, KernelGone, ProtocolError, error_from_errno
from llmos.types import ProcessResult

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


def kernel_address(address: str | None = None, home: Path | str | None = None) -> str:
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


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def model_arg(model: str | os.PathLike | None) -> str | None:
    """Client-side paths are resolved here: the kernel runs in another working directory."""
    if model is None:
        return None
    text = os.fspath(model)
    p = Path(text).expanduser()
    if p.exists() or os.sep in text or text.startswith("."):
        return str(p.resolve())
    return text


def spawn_args(prompt: str | None, messages: list[dict] | None, model: Any, priority: int,
               params: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"prompt": prompt, "messages": messages, "model": model_arg(model),
                            "priority": priority}
    args.update(params)
    return {k: v for k, v in args.items() if v is not None}


class Calls:
    """Request ids and frame interpretation; the transport lives in the client classes."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def request(self, call: str, args: dict[str, Any]) -> tuple[int, bytes]:
        rid = next(self._ids)
        return rid, codec.request(rid, call, args)

    @staticmethod
    def interpret(raw: bytes) -> tuple[Any, str, Any]:
        """Return (request id, kind, payload); raise KernelGone on a bye frame."""
        msg = codec.decode(raw)
        if not isinstance(msg, dict) or "t" not in msg:
            raise ProtocolError("kernel sent a frame without a kind")
        kind = msg["t"]
        if kind == protocol.BYE:
            raise KernelGone(f"kernel stopped: {msg.get('reason', '')}")
        if kind == protocol.OK:
            return msg.get("id"), kind, msg.get("result")
        if kind == protocol.CHUNK:
            return msg.get("id"), kind, msg.get("data")
        if kind == protocol.ERR:
            return msg.get("id"), kind, error_from_errno(msg.get("errno", 5), msg.get("message", ""))
        raise ProtocolError(f"unknown frame kind {kind!r}")


def text_or_raise(result: ProcessResult) -> str:
    """The text of a finished process, or the llmos error it ended with."""
    if result.finish_reason == "error" and result.error:
        raise error_from_errno(result.error["errno"], result.error["message"])
    return result.text
