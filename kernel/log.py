"""Structured logging: one JSON object per line on stderr (and wherever stderr is redirected)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    def __init__(self, component: str, stream: TextIO | None = None, level: str = "info") -> None:
        self.component = component
        self.stream = stream
        self.threshold = _LEVELS[level]

    def log(self, level: str, event: str, **fields: Any) -> None:
        if _LEVELS[level] < self.threshold:
            return
        record = {"ts": round(time.time(), 6), "level": level, "component": self.component, "event": event}
        record.update(fields)
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
