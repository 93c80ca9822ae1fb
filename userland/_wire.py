"""Client-side protocol logic shared by Client and AsyncClient: requests, frame interpretation."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
import inspect
from typing import Any, Callable, TypeVar

import zmq
import zmq.asyncio

from llmos.syscalls import codec, protocol
from llmos.syscalls.address import connect_address
from llmos.syscalls.errors import Errno, InvalidArgument, KernelGone, LLMOSError, ProtocolError, error_from_errno
from llmos.syscalls.table import BY_NAME
from llmos.types import ProcessResult, TurnResult

F = TypeVar("F", bound=Callable[..., Any])
ERROR_CLASS: dict[Errno, str] = {e: type(error_from_errno(e, "")).__name__ for e in Errno}


def bus_context() -> zmq.Context:
    """The process-wide zmq context every Client's socket lives in; no client ever terminates it.

    Why not a context per client: zmq's Context finaliser terminates the context, which waits for every
    socket of it to close. A client dropped without close() inside a reference cycle (an exception's
    traceback holds it) is finalised in arbitrary order, so its context could be terminated before its
    socket closes, and the program hangs at garbage collection. The shared instance is never collected
    (pyzmq holds it, and makes a new one after fork); sockets have linger 0, so none delays the exit.
    """
    return zmq.Context.instance()


def async_bus_context() -> zmq.asyncio.Context:
    """An asyncio view (a shadow: its finaliser terminates nothing) of :func:`bus_context`."""
    return zmq.asyncio.Context(shadow=bus_context())


def current_user() -> str:
    """This process's account name, from its uid (what the kernel sees over ipc), not from $USER."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def check_ipc(address: str) -> None:
    """Fail early, and say why, when an ipc kernel socket is missing or closed to this user."""
    from llmos.syscalls.address import ipc_path
    from llmos.syscalls.errors import KernelUnavailable, NotPermitted

    path = ipc_path(address)
    if path is None:
        return
    try:
        path.stat()
    except PermissionError:
        raise NotPermitted(f"cannot reach {path}: a directory above it is closed to you (a kernel shared with a "
                           f"group is started with `llmos kernel start --group G`, and you must be in G)") from None
    except OSError:
        raise KernelUnavailable(f"no kernel at {address} (socket file does not exist)") from None
    if not os.access(path, os.R_OK | os.W_OK):
        raise NotPermitted(f"cannot connect to {path}: it is not open to you (a kernel shared with a group is "
                           f"started with `llmos kernel start --group G`, and you must be in G)")


HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_monitors = itertools.count(1)


def secure(sock: zmq.Socket, address: str, server_key: str | os.PathLike | None = None,
           client_key: str | os.PathLike | None = None, insecure: bool | None = None) -> zmq.Socket | None:
    """Set ``sock`` up for ``address``: nothing for ipc (the kernel reads the peer's uid); CURVE for tcp
    (the kernel's public key and this client's key pair: syscalls/keys.py says where they are found),
    or plain tcp when ``insecure`` (or $LLMOS_INSECURE=1) asks for it. Returns a monitor socket that
    reports the handshake's outcome (tcp only; close it once read), or None.
    InvalidArgument when tcp has no keys to use."""
    if not address.startswith("tcp://"):
        return None
    if insecure is None:
        insecure = os.environ.get("LLMOS_INSECURE", "") not in ("", "0")
    if not insecure:
        from llmos.syscalls.keys import client_key_pair, keys_dir, server_key as find_server_key

        kernel_key = find_server_key(server_key)
        if kernel_key is None:
            raise InvalidArgument(f"{address} is tcp, encrypted with CURVE: this client needs the kernel's public key "
                                  f"(the kernel's keys/kernel.key: pass it as server_key / --server-key or "
                                  f"$LLMOS_SERVER_KEY; for a kernel started with --insecure: insecure=True or LLMOS_INSECURE=1)")
        pair = client_key_pair(client_key)
        if pair is None:
            raise InvalidArgument(f"{address} is tcp, encrypted with CURVE: this client needs a key pair (none in "
                                  f"{keys_dir() / 'client.key_secret'}): run `llmos keygen`, and have the kernel's "
                                  f"admin authorise the public key with `llmos user add NAME --key FILE`")
        sock.curve_serverkey = kernel_key
        sock.curve_publickey, sock.curve_secretkey = pair
    monitor_address = f"inproc://llmos-handshake-{os.getpid()}-{next(_monitors)}"
    return sock.get_monitor_socket(HANDSHAKE_EVENTS, monitor_address)


def open_dealer(ctx: Any, address: str, server_key: str | os.PathLike | None, client_key: str | os.PathLike | None,
                insecure: bool | None) -> tuple[Any, Any]:
    """A DEALER socket of ``ctx`` connected to ``address``, secured as :func:`secure` says, and its handshake
    monitor (None for ipc). The socket is closed again if anything fails."""
    sock = ctx.socket(zmq.DEALER)  # the shared context: a client never blocks in a finaliser
    sock.setsockopt(zmq.LINGER, 0)
    try:
        monitor = secure(sock, address, server_key, client_key, insecure)
        sock.connect(connect_address(address))
    except BaseException:
        sock.close()
        raise
    return sock, monitor


def await_handshake(sock: zmq.Socket, monitor: zmq.Socket, address: str, timeout: float) -> None:
    """Wait up to ``timeout`` s for the tcp handshake's outcome on ``monitor`` (sync sockets), then stop the
    monitor; raise what a failure means (and close ``sock``). Returns quietly on success, or when nothing was
    heard (the hello then times out)."""
    from zmq.utils.monitor import recv_monitor_message

    curve = sock.get(zmq.MECHANISM) == zmq.CURVE
    try:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and monitor.poll(int(left * 1000) + 1):
            msg = recv_monitor_message(monitor)
            if _handshake_done(msg, address, curve):
                return
    except BaseException:
        sock.close()  # its monitor is closed below (a closed socket's is not disabled first)
        raise
    finally:
        _end_monitor(sock, monitor)


async def await_handshake_async(sock: Any, monitor: Any, address: str, timeout: float) -> None:
    """:func:`await_handshake` for an asyncio socket."""
    from zmq.utils.monitor import parse_monitor_message

    curve = sock.get(zmq.MECHANISM) == zmq.CURVE
    try:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and await monitor.poll(int(left * 1000) + 1):
            msg = parse_monitor_message(await monitor.recv_multipart())
            if _handshake_done(msg, address, curve):
                return
    except BaseException:
        sock.close()  # its monitor is closed below (a closed socket's is not disabled first)
        raise
    finally:
        _end_monitor(sock, monitor)


def _handshake_done(msg: dict, address: str, curve: bool) -> bool:
    failure = handshake_failure(msg["event"], msg["value"], address, curve)
    if failure is not None:
        raise failure
    return msg["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED


def _end_monitor(sock: Any, monitor: Any) -> None:
    if not monitor.closed:
        if not sock.closed:
            sock.disable_monitor()
        monitor.close()


def handshake_failure(event: int, value: int, address: str, curve: bool = True) -> LLMOSError | None:
    """What a handshake event means for the user: None when it succeeded, else the error to raise.
    ``curve``: whether this client spoke CURVE."""
    from llmos.syscalls.errors import NotPermitted, ProtocolError

    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return None
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return NotPermitted(f"the kernel at {address} refused this client's key (ZAP status {value}): have its admin "
                            f"authorise your public key (keys/client.key) with `llmos user add NAME --key FILE`")
    if not curve:
        return ProtocolError(f"the handshake with {address} failed: the kernel and this client disagree on "
                             f"encryption (this client is plain tcp, LLMOS_INSECURE=1; the kernel needs CURVE keys)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return ProtocolError(f"the handshake with {address} failed: the kernel and this client disagree on "
                             f"encryption (this client speaks CURVE; is the kernel's listener --insecure?)")
    return ProtocolError(f"the handshake with {address} failed: the kernel's public key this client used "
                         f"(--server-key, $LLMOS_SERVER_KEY or keys/kernel.key) is not that kernel's, or the kernel's "
                         f"listener is --insecure")


def model_arg(model: str | os.PathLike | None) -> str | None:
    """Client-side paths are resolved here: the kernel runs in another working directory. A path this
    machine cannot even look at (a name too long, an unknown ~user) goes as given: the kernel says why."""
    if model is None:
        return None
    text = os.fspath(model)
    if text.startswith("store:"):  # a model in the kernel's store (store:/models/<name>), not a path here
        return text
    try:
        p = Path(text).expanduser()
        if p.exists() or os.sep in text or text.startswith("."):
            return str(p.resolve())
    except (OSError, RuntimeError, ValueError):
        pass
    return text


def spawn_args(prompt: str | None, messages: list[dict] | None, model: Any, priority: int,
               params: dict[str, Any]) -> dict[str, Any]:
    """The spawn request's args: unset (None) fields are left out, and ``session`` only when true, so that
    a plain spawn is the same frame it always was."""
    args: dict[str, Any] = {"prompt": prompt, "messages": messages, "model": model_arg(model),
                            "priority": priority}
    args.update(params)
    if not args.get("session"):
        args.pop("session", None)
    return {k: v for k, v in args.items() if v is not None}


def session_spawns(system: str | None) -> list[dict[str, Any]]:
    """The spawn args to try, in order, for a session with an optional system prompt: the system message
    (for a model with a chat template), then no prompt at all (the kernel starts the session BLOCKED)."""
    tries: list[dict[str, Any]] = []
    if system is not None:
        tries.append({"messages": [{"role": "system", "content": system}]})
    tries.append({})
    return tries


def no_chat_template(exc: LLMOSError) -> bool:
    """True for the kernel's refusal of chat messages on a model without a chat template."""
    return isinstance(exc, InvalidArgument) and "no chat template" in exc.message


def syscall_doc(name: str) -> Callable[[F], F]:
    """Decorate a client method of syscall ``name``: its docstring becomes the table's description, then
    the method's own text (arguments, shape, units), then the errors the table lists for the call."""
    sc = BY_NAME[name]

    def decorate(fn: F) -> F:
        own = inspect.cleandoc(fn.__doc__ or "")
        errors = ", ".join(f"{e.name} ({ERROR_CLASS.get(e, 'LLMOSError')})" for e in sc.errors)
        fn.__doc__ = "\n\n".join(part for part in (
            sc.doc, own, f"Raises: {errors or 'only the common errors'}; KernelGone if the kernel stops.") if part)
        return fn

    return decorate


class Calls:
    """Request ids and frame interpretation; the transport lives in the client classes."""

    def __init__(self, act_for: str | None = None) -> None:
        self._ids = itertools.count(1)
        self.act_for = act_for  # every call is made for this user (the kernel checks we may: delegation)

    def request(self, call: str, args: dict[str, Any]) -> tuple[int, bytes]:
        rid = next(self._ids)
        return rid, codec.request(rid, call, args, self.act_for)

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


def text_or_raise(result: ProcessResult | TurnResult) -> str:
    """The text of a finished process (or session turn), or the llmos error it ended with."""
    if result.finish_reason == "error" and result.error:
        raise error_from_errno(result.error["errno"], result.error["message"])
    return result.text
