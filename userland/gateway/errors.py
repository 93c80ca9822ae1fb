"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status an
OpenAI client expects, from LLMOS errnos, request validation and authentication."""

from __future__ import annotations

from typing import Any

from llmos.syscalls.errors import Errno, LLMOSError

# errno -> (HTTP status, OpenAI error type); anything else is 500 server_error
STATUS: dict[Errno, tuple[int, str]] = {
    Errno.EINVAL: (400, "invalid_request_error"),
    Errno.E2BIG: (400, "invalid_request_error"),
    Errno.EMSGSIZE: (400, "invalid_request_error"),
    Errno.EPERM: (403, "permission_error"),
    Errno.ENOENT: (404, "invalid_request_error"),
    Errno.ESRCH: (404, "invalid_request_error"),
    Errno.EDQUOT: (429, "rate_limit_error"),
    Errno.EAGAIN: (429, "rate_limit_error"),
    Errno.EBUSY: (503, "server_error"),
    Errno.ENOMEM: (503, "server_error"),
    Errno.ECONNREFUSED: (503, "server_error"),
    Errno.EPIPE: (503, "server_error"),
    Errno.ETIMEDOUT: (504, "server_error"),
}
# OpenAI's own codes where it has one for the same fault; otherwise the code is the errno's name
CODES: dict[Errno, str] = {Errno.E2BIG: "context_length_exceeded", Errno.ENOENT: "model_not_found"}


class HTTPError(Exception):
    """An error the gateway answers with: HTTP ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> HTTPError:
    """400: a request the gateway refuses before the kernel sees it (``param`` names the field)."""
    return HTTPError(400, message, "invalid_request_error", param, "EINVAL")


def from_llmos(exc: LLMOSError, param: str | None = None) -> HTTPError:
    """The HTTP error for an LLMOS error (its errno picks the status; 500 for the rest)."""
    status, kind = STATUS.get(exc.errno, (500, "server_error"))
    if exc.errno is Errno.ENOENT and param is None:
        param = "model"
    return HTTPError(status, exc.message, kind, param, CODES.get(exc.errno, exc.errno.name))


def from_wire(error: dict[str, Any]) -> HTTPError:
    """The HTTP error for an error a process ended with ({errno, error, message}); an empty one is EIO (500)."""
    from llmos.syscalls.errors import error_from_errno

    message = str(error.get("message") or "the process ended with an error the kernel did not describe")
    return from_llmos(error_from_errno(int(error.get("errno", Errno.EIO)), message))


def of_outcome(finish_reason: str, error: dict[str, Any] | None) -> HTTPError | None:
    """The HTTP error of a choice that ended with the kernel's finish reason ``error`` (the error's errno picks
    the status; none given: 500), or None for every other finish reason. A choice that failed is never
    answered as text, even when the kernel said nothing about why."""
    if finish_reason != "error":
        return None
    return from_wire(error or {})


def validation(errors: list[dict[str, Any]]) -> HTTPError:
    """400 for pydantic's validation errors: the first one named, as OpenAI does (``param``: its field)."""
    if not errors:
        return invalid("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return invalid(f"the body is not valid JSON: {first.get('msg', '')}")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return invalid(f"{param or 'body'}: {first.get('msg', 'invalid')}{more}", param)
