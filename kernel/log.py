"""Structured logging: one JSON object per line on stderr (and wherever stderr is redirected).

Every field is bounded (FIELD_CHARS): a client's strings reach the log only as a short prefix
with their length, so no request can make a log line big.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FIELD_CHARS = 300  # a string field longer than this is cut (the cut says how long it was)


def bounded(value: Any, limit: int = FIELD_CHARS) -> Any:
    """``value`` if it is small; a string cut to ``limit`` characters (with its length) otherwise."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(value)
        except RecursionError:
            text = f"<{type(value).__name__} nested too deeply>"
    if len(text) <= limit:
        return value
    return f"{text[:limit]}... ({len(text)} characters)"


class Logger:
    def __init__(self, component: str, stream: TextIO | None = None, level: str = "info") -> None:
        self.component = component
        self.stream = stream
        self.threshold = _LEVELS[level]

    def log(self, level: str, event: str, **fields: Any) -> None:
        if _LEVELS[level] < self.threshold:
            return
        record = {"ts": round(time.time(), 6), "level": level, "component": self.component, "event": event}
        record.update({k: bounded(v) for k, v in fields.items()})
        stream = self.stream or sys.stderr
        try:
            stream.write(json.dumps(record, default=str) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must never take the kernel down

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)


def get_logger(component: str) -> Logger:
    return Logger(component)
