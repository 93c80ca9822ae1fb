"""Errno-style error codes and the exception classes that carry them, named by fault.

Every error that crosses the bus is a pair (errno, message). On the client side the pair
becomes an instance of the class registered for that errno, so callers can catch either
``LLMOSError`` (everything) or the specific fault.
"""

from __future__ import annotations

import reprlib
from enum import IntEnum
from typing import Any

MAX_MESSAGE_CHARS = 1000  # an error message on the wire is cut to this many characters
QUOTE_CHARS = 60  # how much of a client's input an error message quotes


class Errno(IntEnum):
    """Error numbers; the values follow Linux errno where a Linux meaning exists."""

    EPERM = 1  # not permitted: the caller does not own the target
    ENOENT = 2  # no such entry: unknown model, path, name
    ESRCH = 3  # no such process: unknown or already reaped pid
    EIO = 5  # a device failed: a model worker crashed or could not load
    E2BIG = 7  # a request is too large (prompt longer than the model's context)
    EAGAIN = 11  # try again: a resource is temporarily unavailable (the client's reply buffer is full)
    ENOMEM = 12  # out of memory (KV blocks, host budget)
    EBUSY = 16  # the target is busy (a kernel already owns the address)
    EEXIST = 17  # the target exists (a rename without replace onto a taken path)
    EINVAL = 22  # invalid argument: wrong type, out of range, unknown field
    ENOSPC = 28  # no space left on the device that holds the store
    EPIPE = 32  # the peer went away: the kernel stopped while a call was pending
    ENOSYS = 38  # no such syscall
    EPROTO = 71  # protocol error: malformed frame, version mismatch
    EMSGSIZE = 90  # a frame, or a string, array or map in it, exceeds its size bound
    ECANCELED = 125  # the operation was cancelled
    ETIMEDOUT = 110  # a deadline passed
    EDQUOT = 122  # a user's quota is exceeded (KV blocks, tokens per minute)
    ECONNREFUSED = 111  # no kernel answers at the address


# What each error means, for docs/syscalls.md (tests check that every Errno has a line here).
MEANING: dict[Errno, str] = {
    Errno.EPERM: "not permitted: the process belongs to another user",
    Errno.ENOENT: "no such model, path or name",
    Errno.ESRCH: "no such process: the pid never existed or was reaped (by a wait, or by zombie retention)",
    Errno.EIO: "a model worker failed (crashed, could not load), or an internal kernel error",
    Errno.E2BIG: "the prompt is longer than the model's context",
    Errno.EAGAIN: "try again later: this client holds more unread replies than its buffer (--client-buffer), or "
                  "a per-user limit (live processes, KV blocks held) is reached; the message says which and when to "
                  "retry",
    Errno.ENOMEM: "out of memory: KV blocks or the host memory budget, even after evicting idle models",
    Errno.EBUSY: "busy: the model is loaded with other options or has live processes, the run queue is full, or a "
                 "session is generating a reply; the message says what to do",
    Errno.EEXIST: "the target exists: a move (fs_rename) onto a taken path without `replace`",
    Errno.EINVAL: "invalid argument: wrong type, out of range, too long, unknown field; the message names the field",
    Errno.ENOSPC: "no space left on the device that holds the store ($LLMOS_HOME/store): the write was not made; "
                  "what was committed before is intact",
    Errno.EPIPE: "the kernel is stopping: the call was cut short",
    Errno.ENOSYS: "no such syscall",
    Errno.EPROTO: "protocol error: not MessagePack, not a map, no integer id, wrong version, several frames",
    Errno.EMSGSIZE: "a frame, or a string, array or map in it, is over its bound; or a reply would be",
    Errno.ECANCELED: "the call was cancelled (not sent by this kernel; kept for clients that abandon a call)",
    Errno.ETIMEDOUT: "a deadline passed: wait with a timeout, a process's deadline or queue timeout (its partial "
                     "output is kept), a client's own call timeout",
    Errno.EDQUOT: "a user's quota is exceeded (tokens per minute, KV blocks a process would need); the message "
                  "says which limit and when to retry",
    Errno.ECONNREFUSED: "no kernel answers at the address (raised by clients, never sent)",
}


class LLMOSError(Exception):
    """Base of every LLMOS error; carries ``errno`` (an :class:`Errno`) and ``message``."""

    errno_default: Errno = Errno.EIO

    def __init__(self, message: str, errno: Errno | int | None = None) -> None:
        self.errno = Errno(errno) if errno is not None else self.errno_default
        self.message = message
        super().__init__(f"[{self.errno.name}] {message}")

    def to_wire(self) -> dict:
        return wire_error(self.errno, self.message)


def wire_error(errno: Errno | int, message: str) -> dict[str, Any]:
    """The one shape of an error on the wire: ``{errno, error, message}``, the message cut to
    MAX_MESSAGE_CHARS characters so that no error can outgrow a frame."""
    code = Errno(errno)
    text = str(message)
    if len(text) > MAX_MESSAGE_CHARS:
        tail = f"... ({len(text)} characters in all)"
        text = text[:MAX_MESSAGE_CHARS - len(tail)] + tail
    return {"errno": int(code), "error": code.name, "message": text}


_quoter = reprlib.Repr()
_quoter.maxstring = _quoter.maxother = QUOTE_CHARS
_quoter.maxlist = _quoter.maxtuple = _quoter.maxdict = _quoter.maxset = 4
_quoter.maxlevel = 2


def quote_path(path: Any) -> str:
    """A short repr of a path for an error message: its start and its end (where the telling name is),
    at most about QUOTE_CHARS characters, with the length of what was cut."""
    text = str(path)
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    head, tail = QUOTE_CHARS // 3, QUOTE_CHARS - QUOTE_CHARS // 3
    return f"{text[:head] + '...' + text[-tail:]!r} ({len(text)} characters)"


def quote(value: Any) -> str:
    """A short repr of a client's input for an error message: at most about QUOTE_CHARS
    characters of it, with the length of what was cut (a 4 MB name must not come back whole)."""
    if isinstance(value, (str, bytes)) and len(value) > QUOTE_CHARS:
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{value[:QUOTE_CHARS]!r}... ({len(value)} {unit})"
    text = _quoter.repr(value)
    return text if len(text) <= 2 * QUOTE_CHARS else text[:2 * QUOTE_CHARS] + "..."


class NotPermitted(LLMOSError):
    """Raised when the caller may not act on the target (for example, another user's process)."""

    errno_default = Errno.EPERM


class NotFound(LLMOSError):
    """Raised when a named thing (model, path) does not exist. Unknown *pids* raise NoSuchProcess."""

    errno_default = Errno.ENOENT


class NoSuchProcess(LLMOSError):
    """Raised for a pid that never existed or was already reaped."""

    errno_default = Errno.ESRCH


class DeviceError(LLMOSError):
    """Raised when a device failed under the request: a model worker crashed or could not load."""

    errno_default = Errno.EIO


class TooBig(LLMOSError):
    """Raised when the input does not fit the resource (prompt longer than the context window)."""

    errno_default = Errno.E2BIG


class TryAgain(LLMOSError):
    """Raised when a resource is temporarily exhausted; the same call may succeed later."""

    errno_default = Errno.EAGAIN


class QuotaExceeded(LLMOSError):
    """Raised when a user's quota (tokens per minute, KV blocks) does not allow the request."""

    errno_default = Errno.EDQUOT


class OutOfMemory(LLMOSError):
    """Raised when memory (KV blocks, host budget) cannot be allocated even after eviction."""

    errno_default = Errno.ENOMEM


class Busy(LLMOSError):
    """Raised when the target is held by someone else (a kernel already serves the address)."""

    errno_default = Errno.EBUSY


class Exists(LLMOSError):
    """Raised when the target already exists and the call was not told to replace it (fs_rename)."""

    errno_default = Errno.EEXIST


class InvalidArgument(LLMOSError):
    """Raised by the kernel for a request whose fields have the wrong type, range or name."""

    errno_default = Errno.EINVAL


class NoSpace(LLMOSError):
    """Raised when a write to the store cannot be committed because its filesystem is full.

    Nothing of that write is kept, and everything committed before it is intact (unlike DeviceError,
    which says the device itself failed). Free space, then retry.
    """

    errno_default = Errno.ENOSPC


class KernelGone(LLMOSError):
    """Raised on the client when the kernel stopped or died while a call was pending.

    Unlike KernelUnavailable, the kernel was there when the call began.
    """

    errno_default = Errno.EPIPE


class KernelRestarted(KernelGone):
    """Raised on the client for a call pending on a kernel that was replaced by a new one (killed, restarted).

    A subclass of KernelGone (errno EPIPE): the kernel the call went to is gone. ``pids``: the processes the
    pending calls were about (``wait``, ``stream``...); they survive a restart (the journal keeps them), so
    ``wait``/``stream`` them again. By then the client has said hello to the new kernel: its identity is kept.
    Client-side only: never sent by a kernel.
    """

    def __init__(self, message: str, errno: Errno | int | None = None, pids: tuple[int, ...] = ()) -> None:
        super().__init__(message, errno)
        self.pids = tuple(pids)


class NoSuchSyscall(LLMOSError):
    """Raised for a syscall name or number that is not in the table."""

    errno_default = Errno.ENOSYS


class ProtocolError(LLMOSError):
    """Raised for a frame that cannot be decoded or a protocol version that does not match."""

    errno_default = Errno.EPROTO


class FrameTooLarge(LLMOSError):
    """Raised when a frame exceeds the codec's size bound."""

    errno_default = Errno.EMSGSIZE


class Cancelled(LLMOSError):
    """Raised when an operation was cancelled before it completed."""

    errno_default = Errno.ECANCELED


class TimedOut(LLMOSError):
    """Raised when a deadline passes (a ``wait`` with a timeout, an unanswered call)."""

    errno_default = Errno.ETIMEDOUT


class KernelUnavailable(LLMOSError):
    """Raised on the client when no kernel answers at the address at all."""

    errno_default = Errno.ECONNREFUSED


_BY_ERRNO: dict[Errno, type[LLMOSError]] = {
    cls.errno_default: cls
    for cls in (
        NotPermitted, NotFound, NoSuchProcess, DeviceError, TooBig, TryAgain, QuotaExceeded, OutOfMemory, Busy,
        Exists, InvalidArgument, NoSpace, KernelGone, NoSuchSyscall, ProtocolError, FrameTooLarge, Cancelled,
        TimedOut, KernelUnavailable,
    )
}


def error_from_errno(errno: int, message: str) -> LLMOSError:
    """Build the exception registered for ``errno`` (LLMOSError for unknown numbers)."""
    try:
        code = Errno(errno)
    except ValueError:
        return LLMOSError(f"{message} (unknown errno {errno})", Errno.EIO)
    return _BY_ERRNO.get(code, LLMOSError)(message, code)
