"""Errno-style error codes and the exception classes that carry them, named by fault.

Every error that crosses the bus is a pair (errno, message). On the client side the pair
becomes an instance of the class registered for that errno, so callers can catch either
``LLMOSError`` (everything) or the specific fault.
"""

from __future__ import annotations

from enum import IntEnum


class Errno(IntEnum):
    """Error numbers; the values follow Linux errno where a Linux meaning exists."""

    EPERM = 1  # not permitted: the caller does not own the target
    ENOENT = 2  # no such entry: unknown model, path, name
    ESRCH = 3  # no such process: unknown or already reaped pid
    EIO = 5  # a device failed: a model worker crashed or could not load
    E2BIG = 7  # a request is too large (prompt longer than the model's context)
    EAGAIN = 11  # try again: a resource is temporarily unavailable
    ENOMEM = 12  # out of memory (KV blocks, host budget)
    EBUSY = 16  # the target is busy (a kernel already owns the address)
    EINVAL = 22  # invalid argument: wrong type, out of range, unknown field
    EPIPE = 32  # the peer went away: the kernel stopped while a call was pending
    ENOSYS = 38  # no such syscall
    EPROTO = 71  # protocol error: malformed frame, version mismatch
    EMSGSIZE = 90  # a frame exceeds the size bound
    ECANCELED = 125  # the operation was cancelled
    ETIMEDOUT = 110  # a deadline passed
    ECONNREFUSED = 111  # no kernel answers at the address


class LLMOSError(Exception):
    """Base of every LLMOS error; carries ``errno`` (an :class:`Errno`) and ``message``."""

    errno_default: Errno = Errno.EIO

    def __init__(self, message: str, errno: Errno | int | None = None) -> None:
        self.errno = Errno(errno) if errno is not None else self.errno_default
        self.message = message
        super().__init__(f"[{self.errno.name}] {message}")

    def to_wire(self) -> dict:
        return {"errno": int(self.errno), "error": self.errno.name, "message": self.message}


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


class OutOfMemory(LLMOSError):
    """Raised when memory (KV blocks, host budget) cannot be allocated even after eviction."""

    errno_default = Errno.ENOMEM


class Busy(LLMOSError):
    """Raised when the target is held by someone else (a kernel already serves the address)."""

    errno_default = Errno.EBUSY


class InvalidArgument(LLMOSError):
    """Raised by the kernel for a request whose fields have the wrong type, range or name."""

    errno_default = Errno.EINVAL


class KernelGone(LLMOSError):
    """Raised on the client when the kernel stopped or died while a call was pending.

    Unlike KernelUnavailable, the kernel was there when the call began.
    """

    errno_default = Errno.EPIPE


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
        NotPermitted, NotFound, NoSuchProcess, DeviceError, TooBig, TryAgain, OutOfMemory, Busy,
        InvalidArgument, KernelGone, NoSuchSyscall, ProtocolError, FrameTooLarge, Cancelled,
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
