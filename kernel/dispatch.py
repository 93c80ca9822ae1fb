"""Turn one request frame into its replies: any chunks, then exactly one final frame.

Decode, check the envelope and version, find the syscall, validate its args against the
table's schema, make the call for the user the envelope's ``for`` names when the caller may act for it
(kernel/delegation.py), check the table's access rule for the caller (EPERM, audited), call the handler,
encode its result. Every fault becomes an error frame to that
caller, with the request's id whenever it can be read; a result too big for a frame becomes
EMSGSIZE. Nothing here can raise into the bus (cancellation aside: a client that is gone gets
nothing).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

from llmos.kernel.actor import ActorStopped
from llmos.kernel.handlers import Caller, Handlers, handler_for
from llmos.kernel.log import get_logger
from llmos.syscalls import codec, protocol
from llmos.syscalls.errors import (Errno, FrameTooLarge, LLMOSError, NoSuchSyscall, NotPermitted, ProtocolError,
                                   quote)
from llmos.syscalls.schema import validate
from llmos.syscalls.table import ADMIN, ANY, OWNER, PATH, Syscall, lookup

log = get_logger("dispatch")


class Replies(Protocol):
    """Where one client's replies go (the Bus's outbox for that client)."""

    def chunk(self, rid: Any, data: Any) -> None: ...

    def final(self, rid: Any, frame: bytes) -> None: ...


class _WithId(Exception):
    def __init__(self, rid: int | None, error: LLMOSError) -> None:
        self.rid, self.error = rid, error


def parse_request(frame: bytes) -> tuple[int, Any, Any, Any]:
    """Return (request id, call, args, the user it is made for or None); raise _WithId(id or None, error) for a
    bad frame."""
    try:
        msg = codec.decode(frame)
    except LLMOSError as exc:  # over a bound (EMSGSIZE) or not MessagePack (EPROTO): find the id anyway
        raise _WithId(codec.peek_id(frame), exc) from None
    if not isinstance(msg, dict):
        raise _WithId(None, ProtocolError(f"a request must be a map, got {type(msg).__name__}"))
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise _WithId(None, ProtocolError("a request needs an integer 'id'"))
    if msg.get("v") != protocol.PROTOCOL_VERSION:
        raise _WithId(rid, ProtocolError(f"protocol version {quote(msg.get('v'))} is not supported; "
                                         f"this kernel speaks {protocol.PROTOCOL_VERSION}"))
    if "call" not in msg:
        raise _WithId(rid, ProtocolError("a request needs a 'call' (syscall name or number)"))
    return rid, msg["call"], msg.get("args"), msg.get("for")


def error_frame(rid: int | None, exc: BaseException) -> bytes:
    """The final error frame for a fault, named by its kind; never raises."""
    if isinstance(exc, LLMOSError):
        return codec.error(rid, exc.errno, None, exc.message)
    if isinstance(exc, ActorStopped):
        return codec.error(rid, Errno.EPIPE, None, f"kernel is stopping: {exc}")
    log.error("handler_crashed", id=rid, error=repr(exc))
    # a bug's exception may carry a client's input (a path, a name): say what broke, not all of it
    return codec.error(rid, Errno.EIO, None, f"internal kernel error: {type(exc).__name__}: {_cut(str(exc))}")


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def result_frame(rid: int, result: Any) -> bytes:
    """The final ok frame, or EMSGSIZE (too big for a frame) or EIO (not encodable) in its place."""
    try:
        return codec.ok(rid, result)
    except FrameTooLarge as exc:
        return codec.error(rid, Errno.EMSGSIZE, None, f"the reply is too big to send: {exc.message}")
    except ProtocolError as exc:
        log.error("reply_unencodable", id=rid, error=exc.message)
        return codec.error(rid, Errno.EIO, None, f"internal kernel error: {exc.message}")


FS_WRITES = ("fs_put", "fs_remove", "fs_rename")


@functools.lru_cache(maxsize=None)
def _defaults(sc: Syscall) -> dict[str, Any]:
    return {f.name: f.default_value() for f in sc.request}


async def check_access(sc: Syscall, caller: Caller, args: dict, handlers: Handlers) -> str | None:
    """Enforce the table's access rule for ``sc`` (NotPermitted, EPERM, when it does not allow the caller);
    return what makes the call an administrative action, to audit, or None."""
    rule = sc.access
    if rule.who == ANY and not rule.admin_args and not rule.admin_below_zero:
        return None  # the common case (ping, ps, models...): nothing to check
    raised = [a for a in rule.admin_args if args.get(a) != _defaults(sc)[a]] + \
             [a for a in rule.admin_below_zero if isinstance(args.get(a), int) and args[a] < 0]
    owner = await handlers.owner_of(args["pid"]) if rule.who == OWNER else None
    if not caller.admin:
        if rule.who == ADMIN:
            raise NotPermitted(f"{sc.name} is the admin's (the kernel's owner or root); you are {caller.user}")
        if raised:
            what = ", ".join(f"{a}={quote(args[a])}" for a in raised)
            raise NotPermitted(f"{sc.name} with {what} is the admin's (the kernel's owner or root); you are "
                               f"{caller.user}")
        if owner is not None and owner != caller.user:
            raise NotPermitted(f"process {args['pid']} belongs to {owner}, not {caller.user}")
        return None
    if rule.who == ADMIN or raised:
        return ", ".join(raised) or "admin only"
    if owner is not None and owner != caller.user:
        return f"process {args['pid']} of {owner}"
    if rule.who == PATH and sc.name in FS_WRITES and any(
            str(args.get(k) or "").startswith("/models") for k in ("path", "src", "dst")):
        return "writes /models"
    return None


async def dispatch(handlers: Handlers, caller: Caller, frame: bytes, replies: Replies) -> None:
    """Serve one request frame; ``replies`` gets its chunks, then exactly one final frame."""
    rid: int | None = None
    name, administrative, args = "?", None, {}
    try:
        try:
            rid, call, raw_args, act_for = parse_request(frame)
        except _WithId as w:
            rid = w.rid
            raise w.error from None
        sc = lookup(call)
        name = sc.name
        if act_for is not None:
            caller = caller.acting_for(act_for, handlers.k.delegation)
        fn = handler_for(handlers, sc.name)
        if fn is None:
            raise NoSuchSyscall(f"syscall {sc.name} has no handler in this kernel")
        args = validate(sc.request, raw_args)
        administrative = await check_access(sc, caller, args, handlers)
        request_id = rid

        async def emit(data: Any) -> None:
            replies.chunk(request_id, data)

        final = result_frame(rid, await fn(caller, args, emit))
        if administrative is not None:
            _audit_admin(handlers, caller, sc.name, administrative, args, "ok")
    except Exception as exc:  # a handler bug must not take the bus down
        if isinstance(exc, LLMOSError) and exc.errno == Errno.EPERM:
            handlers.audit.refused(caller.user, name, exc.message, transport=caller.transport,
                                   **({"by": caller.by} if caller.by else {}))
        elif administrative is not None:  # an administrative action that failed is said as such
            _audit_admin(handlers, caller, name, administrative, args, getattr(getattr(exc, "errno", None), "name",
                                                                               type(exc).__name__))
        final = error_frame(rid, exc)
    replies.final(rid, final)


def _audit_admin(handlers: Handlers, caller: Caller, call: str, why: str, args: dict, result: str) -> None:
    handlers.audit.admin(caller.user, call, why=why, result=result, pid=args.get("pid"),
                         target=args.get("model") or args.get("path") or args.get("src") or args.get("user"),
                         **({"by": caller.by} if caller.by else {}))
