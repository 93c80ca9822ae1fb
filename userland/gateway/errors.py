"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status an
OpenAI client expects, from LLMOS errnos, request validation and authentication."""

from __future__ import annotations

import re
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
# the spawn syscall's field -> the request's field an EINVAL of the kernel is about (its message names the former)
KERNEL_FIELDS = {"prompt_ids": "prompt", "prompt": "prompt", "messages": "messages", "max_new_tokens": "max_tokens",
                 "stop": "stop", "seed": "seed", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "repetition_penalty": "repetition_penalty", "priority": "priority", "ignore_eos": "ignore_eos"}
# how the kernel's messages name a field: "field 'stop' has 17 items", "item 3 of 'stop'", "prompt_ids must be"
_KERNEL_FIELD = re.compile(r"\b(?:field|of) '(\w+)'|^(\w+)\b")
# pydantic names the member of a Union a value was tried as in the error's location ('str', 'list[int]'):
# not a field of the request
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\]|function-.*|constrained-.*)$")


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
    """The HTTP error for an LLMOS error (its errno picks the status; 500 for the rest). ``param`` (None: the
    model for ENOENT, the field an EINVAL's message names, see :func:`kernel_param`)."""
    status, kind = STATUS.get(exc.errno, (500, "server_error"))
    if exc.errno is Errno.ENOENT and param is None:
        param = "model"
    if exc.errno is Errno.EINVAL and param is None:
        param = kernel_param(exc.message)
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


def kernel_param(message: str) -> str | None:
    """The request field a kernel's EINVAL message is about ("field 'stop' has 17 items": ``stop``; "prompt_ids
    must be ... token ids in [0, V)": ``prompt``), or None when it names none the request has."""
    for m in _KERNEL_FIELD.finditer(message):
        name = m.group(1) or m.group(2)
        if name in KERNEL_FIELDS:
            return KERNEL_FIELDS[name]
    return None


def _param(error: dict[str, Any]) -> tuple[str | None, str | None]:
    """An error's field as a dotted path (``messages.0.role``; a Union's: the path to the Union), and the Union
    member the value was tried as (None: not in a Union)."""
    loc = [p for p in error.get("loc", ()) if p != "body"]
    for i, p in enumerate(loc):
        if isinstance(p, str) and _UNION_TAG.match(p):
            return ".".join(map(str, loc[:i])) or None, p
    return ".".join(map(str, loc)) or None, None


def validation(errors: list[dict[str, Any]]) -> HTTPError:
    """400 for pydantic's validation errors: the first field named, as OpenAI does (``param``: its dotted path,
    ``messages.0.role``); a value that fits none of a Union's forms is one error, its forms listed."""
    if not errors:
        return invalid("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return invalid(f"the body is not valid JSON: {first.get('msg', '')}")
    param, tag = _param(first)
    named = [_param(e) for e in errors]
    fields = {p for p, _ in named}
    more = f" (and {len(fields) - 1} more)" if len(fields) > 1 else ""
    where = param or "body"
    if tag is not None:
        mine = [(e, t) for e, (p, t) in zip(errors, named) if p == param and t is not None]
        forms = ", ".join(dict.fromkeys(t.replace("constrained-", "") for _, t in mine))
        # a value of the right type that broke a bound says more than "not a string" for every other form
        bound = next((e for e, _ in mine if not str(e.get("type", "")).endswith("_type")), None)
        why = ""
        if bound is not None:
            loc = list(bound["loc"])
            at = "".join(f"[{p}]" for p in loc[loc.index(_param(bound)[1]) + 1:])  # the item, after the form
            why = f"; {where}{at}: {bound['msg']}"
        return invalid(f"{where}: fits none of its forms ({forms}){why}{more}", param)
    msg = str(first.get("msg", "invalid"))
    if first.get("type") == "stop":  # ours (schema.py), which names the field itself
        return invalid(msg + more, param)
    return invalid(f"{where}: {msg}{more}", param)
