"""LLMOS for programs: ``from llmos import LLMOS``.

The public names are pinned by tests/userland/test_public_api.py.
"""

from llmos.aclient import AsyncClient
from llmos.client import Client, OutputStream
from llmos.llmos import LLMOS
from llmos.syscalls.errors import (
    DeviceError,
    Errno,
    InvalidArgument,
    KernelGone,
    KernelUnavailable,
    LLMOSError,
    NoSuchProcess,
    NotFound,
    NotPermitted,
    TimedOut,
    TooBig,
)
from llmos.types import ProcessInfo, ProcessResult, Stats

__version__ = "0.1.0"

__all__ = [
    "LLMOS", "Client", "AsyncClient", "OutputStream", "ProcessResult", "ProcessInfo", "Stats",
    "LLMOSError", "Errno", "InvalidArgument", "NotFound", "NoSuchProcess", "NotPermitted", "TimedOut",
    "TooBig", "DeviceError", "KernelGone", "KernelUnavailable",
]
