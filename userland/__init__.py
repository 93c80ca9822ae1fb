"""LLMOS for programs: ``from llmos import LLMOS``.

The public names are pinned by tests/userland/test_public_api.py. They are imported on first use
(PEP 562), so that ``import llmos`` costs nothing until a name is needed: the ``llmos`` command's
entry point must be able to catch a Ctrl-C while the rest is still importing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_ERRORS = "llmos.syscalls.errors"
_WHERE = {
    "LLMOS": "llmos.llmos", "Client": "llmos.client", "AsyncClient": "llmos.aclient", "OutputStream": "llmos.client",
    "ProcessResult": "llmos.types", "ProcessInfo": "llmos.types", "Stats": "llmos.types",
    "TurnResult": "llmos.types", "Session": "llmos.session",
    **{name: _ERRORS for name in ("LLMOSError", "Errno", "InvalidArgument", "NotFound", "NoSuchProcess",
                                  "NotPermitted", "TimedOut", "TooBig", "DeviceError", "KernelGone",
                                  "KernelUnavailable", "KernelRestarted", "QuotaExceeded", "TryAgain", "Busy",
                                  "NoSpace")},
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'llmos' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from llmos.aclient import AsyncClient
    from llmos.client import Client, OutputStream
    from llmos.llmos import LLMOS
    from llmos.session import Session
    from llmos.syscalls.errors import (Busy, DeviceError, Errno, InvalidArgument, KernelGone, KernelRestarted,
                                       KernelUnavailable, LLMOSError, NoSpace, NoSuchProcess, NotFound, NotPermitted,
                                       QuotaExceeded, TimedOut, TooBig, TryAgain)
    from llmos.types import ProcessInfo, ProcessResult, Stats, TurnResult
