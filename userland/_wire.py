"""Client-side protocol logic shared by Client and AsyncClient: requests, frame interpretation."""

from __future__ import annotations

import getpass
import itertools
import os
from pathlib import Path
from typing import Any

from llmos.syscalls import codec, protocol
from llmos.syscalls.errors import KernelGone, ProtocolError, error_from_errno
from llmos.types import ProcessResult

def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def model_arg(model: str | os.PathLike | None) -> str | None:
    """Client-side paths are resolved here: the kernel runs in another working directory. A path this
    machine cannot even look at (a name too long, an unknown ~user) goes as given: the kernel says why."""
    if model is None:
        return None
    text = os.fspath(model)
    try:
        p = Path(text).expanduser()
        if p.exists() or os.sep in text or text.startswith("."):
            return str(p.resolve())
    except (OSError, RuntimeError, ValueError):
        pass
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
