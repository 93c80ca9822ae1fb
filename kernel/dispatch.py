"""Turn one request frame into one reply (or a stream of chunks and a final frame).

Decode, check the envelope and version, find the syscall, validate its args against the
table's schema, call the handler. Every fault becomes an error frame to that caller; nothing
here can raise into the bus.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from llmos.kernel.actor import ActorStopped
from llmos.kernel.handlers import Caller, Handlers, handler_for
from llmos.kernel.log import get_logger
from llmos.syscalls import codec, protocol
from llmos.syscalls.errors import Errno, LLMOSError, NoSuchSyscall, ProtocolError
from llmos.syscalls.schema import validate
from llmos.syscalls.table import lookup

Send = Callable[[bytes], Awaitable[None]]
log = get_logger("dispatch")


def parse_request(frame: bytes) -> tuple[Any, Any, dict]:
    """Return (request id, call, args) or raise ProtocolError. The id is recovered when possible."""
    msg = codec.decode(frame)
    if not isinstance(msg, dict):
        raise ProtocolError(f"a request must be a map, got {type(msg).__name__}")
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolError("a request needs an integer 'id'")
    if msg.get("v") != protocol.PROTOCOL_VERSION:
        raise _WithId(rid, ProtocolError(f"protocol version {msg.get('v')!r} is not supported; "
                                         f"this kernel speaks {protocol.PROTOCOL_VERSION}"))
    if "call" not in msg:
        raise _WithId(rid, ProtocolError("a request needs a 'call' (syscall name or number)"))
    return rid, msg["call"], msg.get("args")


class _WithId(Exception):
    def __init__(self, rid: int, error: LLMOSError) -> None:
        self.rid, self.error = rid, error


async def dispatch(handlers: Handlers, caller: Caller, frame: bytes, send: Send) -> None:
    rid = None
    try:
        try:
            rid, call, raw_args = parse_request(frame)
        except _WithId as w:
            rid = w.rid
            raise w.error from None
        sc = lookup(call)
        fn = handler_for(handlers, sc.name)
        if fn is None:
            raise NoSuchSyscall(f"syscall {sc.name} has no handler in this kernel")
        args = validate(sc.request, raw_args)

        async def emit(data: Any) -> None:
            await send(codec.chunk(rid, data))

        result = await fn(caller, args, emit)
        await send(codec.ok(rid, result))
    except LLMOSError as exc:
        await _send_error(send, rid, exc.errno, exc.message)
    except ActorStopped as exc:
        await _send_error(send, rid, Errno.EPIPE, f"kernel is stopping: {exc}")
    except Exception as exc:  # a handler bug must not take the bus down
        log.error("handler_crashed", id=rid, error=repr(exc))
        await _send_error(send, rid, Errno.EIO, f"internal kernel error: {type(exc).__name__}: {exc}")


async def _send_error(send: Send, rid: Any, errno: Errno, message: str) -> None:
    try:
        await send(codec.error(rid, int(errno), Errno(errno).name, message))
    except Exception as exc:
        log.warning("reply_lost", id=rid, error=repr(exc))
