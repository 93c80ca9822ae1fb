"""The LLMOS syscall ABI: the table, the error codes, the frame codec and protocol constants.

This package is the single source of truth for the interface between user programs and the
kernel. It imports nothing from ``llmos.kernel`` or ``llmos`` (userland).
"""

from llmos.syscalls.errors import Errno, LLMOSError, error_from_errno
from llmos.syscalls.protocol import PROTOCOL_VERSION
from llmos.syscalls.table import SYSCALLS, Syscall, lookup

__all__ = ["Errno", "LLMOSError", "error_from_errno", "PROTOCOL_VERSION", "SYSCALLS", "Syscall", "lookup"]
